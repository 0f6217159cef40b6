"""The admin plane's HTML: the status page, its live-update script, login and authorization forms.

Theory of operation
-------------------
Pages are rendered on the server from the status snapshot (:mod:`gateway.admin.status`) with
:func:`html.escape` on every value, so the page is complete without JavaScript. The script
(:data:`STATUS_JS`, served as ``/static/status.js``: the Content-Security-Policy allows no
inline script) opens the ``/events`` WebSocket and, whenever an event arrives, re-fetches the
server-rendered ``/status/fragment`` and swaps it in (debounced; also every
:data:`REFRESH_SECONDS` for ages and byte counts). One renderer, no build step, no framework.

Nothing secret can reach a page: the snapshot holds none, and the authorization form shows only
the user name and opaque one-time values (flow id, CSRF token).
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping
from typing import Any

REFRESH_SECONDS = 5
EVENT_FIELDS_SHOWN = ("user", "protocol", "peer", "reason", "outcome", "provider", "latency_ms",
                      "bytes_in", "bytes_out", "duration", "users")

STATUS_CSS = """\
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3} .bad{color:#a00;font-weight:bold} .ok{color:#070} .muted{color:#777}
#live{font-size:.8em;padding:.1em .5em;border-radius:.5em;background:#eee}
#live.on{background:#cfc} form p{margin:.6em 0} .error{color:#a00}
"""

STATUS_JS = """\
"use strict";
(function () {
  var pending = null, live = document.getElementById("live");
  function refresh() {
    pending = null;
    fetch("/status/fragment", {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) { document.getElementById("status").innerHTML = text; })
      .catch(function () {});
  }
  function soon() { if (pending === null) { pending = setTimeout(refresh, 250); } }
  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var ws = new WebSocket(scheme + location.host + "/events");
    ws.onopen = function () { live.textContent = "live"; live.className = "on"; };
    ws.onmessage = soon;
    ws.onclose = function () {
      live.textContent = "reconnecting"; live.className = "";
      setTimeout(connect, 2000);
    };
  }
  connect();
  setInterval(refresh, %d);
})();
""" % (REFRESH_SECONDS * 1000)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(ts: float | None) -> str:
    if not ts:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _table(cls: str, headers: Iterable[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="muted" id="{cls}-empty">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table id="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _page(title: str, body: str, *, script: bool = False) -> str:
    js = '<script src="/static/status.js"></script>' if script else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f'<title>{_e(title)}</title><link rel=stylesheet href="/static/status.css"></head>'
        f"<body>{body}{js}</body></html>"
    )


# --- status ----------------------------------------------------------------------------------


def status_fragment(snap: Mapping[str, Any]) -> str:
    gw = snap["gateway"]
    state = '<span class="bad">draining</span>' if gw["draining"] else '<span class="ok">running</span>'
    parts = [
        f"<p>mailgate {_e(gw['version'])} on {_e(gw['hostname'])}: {state}, up "
        f"{_e(_duration(gw['uptime']))} (since {_e(_when(gw['started_at']))})</p>",
        "<h2>Listeners</h2>",
        _table("listeners", ["protocol", "address", "TLS"], [
            [_e(x["protocol"]), _e(x["address"]), _e(x["tls"])] for x in snap["listeners"]
        ], "no listeners"),
        f"<h2>Sessions ({len(snap['sessions'])})</h2>",
        _table("sessions", ["user", "protocol", "client", "TLS", "state", "upstream", "in", "out",
                            "duration"] + (["worker"] if "workers" in gw else []), [
            [_e(s["user"] or "—"), _e(s["protocol"]), _e(s["peer"]), "yes" if s["tls"] else "no",
             _e(s["state"]), _e(s["upstream"] or "—"), _e(_bytes(s["bytes_in"])),
             _e(_bytes(s["bytes_out"])), _e(_duration(s["duration"]))]
            + ([_e(s.get("worker"))] if "workers" in gw else [])
            for s in snap["sessions"]
        ], "no client is connected"),
        "<h2>Accounts</h2>",
        _table("accounts", ["user", "upstream account", "provider", "authorized", "token valid until",
                            "status", "last error", ""], [
            _account_row(a) for a in snap["accounts"]
        ], "no users are configured"),
        "<h2>Recent events</h2>",
        _table("events", ["time", "event", "details"], [
            [_e(_when(ev.get("time"))), _e(ev.get("type")), _e(_event_details(ev))]
            for ev in reversed(snap["events"])
        ], "nothing happened yet"),
    ]
    return "".join(parts)


def _account_row(a: Mapping[str, Any]) -> list[str]:
    needs = a["status"] == "needs_reauthorization" or not a["authorized"]
    if not a["authorized"]:
        status = '<span class="bad">not authorized</span>'
    elif a["status"] == "needs_reauthorization":
        status = f'<span class="bad">needs re-authorization</span> ({_e(a["status_detail"])})'
    else:
        status = '<span class="ok">ok</span>'
    sending = a.get("sending_problem")
    if sending:
        status += (f'<br><span class="bad">sending: {_e(sending["key"])}</span> '
                   f'({_e(sending["reply"])}) {_e(sending["advice"])}')
    err = a.get("last_error")
    last_error = f"{_e(_when(err.get('time')))}: {_e(err.get('type'))} {_e(err.get('reason'))}" if err else "—"
    action = ""
    if a["flow"] == "authorization_code":
        label = "authorize" if needs else "re-authorize"
        action = f'<a href="/authorize/{_e(a["name"])}">{label}</a>'
    return [_e(a["name"]), _e(a["upstream_user"]), _e(f"{a['provider']} ({a['flow']})"),
            "yes" if a["authorized"] else "no", _e(_when(a["token_valid_until"])), status,
            last_error, action]


def _event_details(event: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={event[k]}" for k in EVENT_FIELDS_SHOWN if event.get(k) not in (None, ""))


def status_page(snap: Mapping[str, Any]) -> str:
    body = (
        '<h1>mailgate <span id="live">static</span></h1>'
        f'<div id="status">{status_fragment(snap)}</div>'
    )
    return _page("mailgate status", body, script=True)


# --- login (token mode) ----------------------------------------------------------------------


def login_page(next_target: str, error: str | None = None) -> str:
    err = f'<p class="error">{_e(error)}</p>' if error else ""
    body = (
        "<h1>mailgate admin</h1>" + err +
        '<form method="post" action="/login">'
        f'<input type="hidden" name="next" value="{_e(next_target)}">'
        '<p><label>Admin token <input type="password" name="token" autocomplete="off" '
        "required></label></p>"
        '<p><button type="submit">Log in</button></p></form>'
    )
    return _page("mailgate admin login", body)


# --- authorization ---------------------------------------------------------------------------


def password_form(user: str, *, flow_id: str, csrf: str, existing: bool,
                  error: str | None = None) -> str:
    err = f'<p class="error" id="error">{_e(error)}</p>' if error else ""
    if existing:
        intro = (f"<p>The identity provider approved the access for <b>{_e(user)}</b>. "
                 f"Confirm {_e(user)}'s current local password to store the new authorization "
                 "(the password mail clients use with this gateway).</p>")
        fields = ('<p><label>Local password <input type="password" name="password" id="password" '
                  'autocomplete="current-password" required></label></p>')
    else:
        intro = (f"<p>The identity provider approved the access for <b>{_e(user)}</b>. "
                 f"Set the local password {_e(user)}'s mail clients will use with this "
                 "gateway.</p>")
        fields = ('<p><label>New local password <input type="password" name="password" '
                  'id="password" autocomplete="new-password" required></label></p>'
                  '<p><label>Again <input type="password" name="confirm" id="confirm" '
                  'autocomplete="new-password" required></label></p>')
    body = (
        f"<h1>Authorize {_e(user)}</h1>{err}{intro}"
        '<form method="post" action="/oauth/complete" id="password-form">'
        f'<input type="hidden" name="flow" value="{_e(flow_id)}">'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
        f'{fields}<p><button type="submit" id="submit">Save</button></p></form>'
    )
    return _page(f"Authorize {user}", body)


def message_page(title: str, message: str, *, ok: bool) -> str:
    cls = "ok" if ok else "error"
    body = (f'<h1>{_e(title)}</h1><p class="{cls}" id="result">{_e(message)}</p>'
            '<p><a href="/">Back to the status page</a></p>')
    return _page(title, body)
