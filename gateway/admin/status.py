"""The status snapshot behind ``GET /`` and ``GET /api/status``: what the gateway is doing now.

Theory of operation
-------------------
The snapshot is built on request from three sources and is plain JSON-able data:

* the server: bound listeners, the live :class:`~gateway.net.ClientStream` set (user, protocol,
  peer, bytes, age), whether it is draining. A session is ``authenticated`` once its front end
  set its ``user``, which happens only after the upstream login answered OK, so such a session
  has its upstream connection (``upstream: connected``); before that it is ``connected`` with
  no upstream;
* the credential store (:class:`~gateway.ports.CredentialStore`, read in a worker thread):
  which accounts are authorized and the status the token manager recorded
  (``needs_reauthorization`` with its detail);
* :class:`AccountActivity`, an event-bus observer remembering per user the last token refresh
  and the last error (token failures, upstream errors, logins refused for re-authorization).

Access-token expiry comes from the running account (:class:`~gateway.ports.AccountView`) and
is shown as a wall-clock time. Nothing secret is ever part of the snapshot: no token, no
password, no verifier; events carry none (see :mod:`gateway.events`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

from .. import __version__
from ..oauth.send_scope import send_scope_problem

if TYPE_CHECKING:
    from ..config import ListenerConfig
    from ..ports import Accounts, CredentialStore
    from ..server import GatewayServer

RECENT_EVENTS_SHOWN = 50
ERROR_EVENTS = frozenset({"token.failed", "upstream.error"})


class AccountActivity:
    """Event-bus observer: per user, the last token refresh and the last error."""

    def __init__(self) -> None:
        self.last_refresh: dict[str, float] = {}
        self.last_error: dict[str, dict[str, Any]] = {}

    def __call__(self, event: Mapping[str, Any]) -> None:
        user = event.get("user")
        if not isinstance(user, str):
            return
        kind = event.get("type")
        if kind == "token.refreshed":
            self.last_refresh[user] = float(event.get("time") or time.time())
        elif kind in ERROR_EVENTS or (
            kind == "login.failed" and event.get("reason") in ("reauthorization_required", "temporary")
        ):
            self.last_error[user] = {
                "type": kind, "reason": event.get("reason"), "time": event.get("time"),
            }


def listeners_snapshot(
    listeners: "list[ListenerConfig]", addresses: list[tuple[str, int]]
) -> list[dict[str, Any]]:
    """The listeners bound at start (a reload does not rebind them) and their real ports."""
    return [
        {"protocol": lst.protocol, "bind": lst.bind, "tls": lst.tls, "address": _hostport(h, p)}
        for lst, (h, p) in zip(listeners, addresses)
    ]


def sessions_snapshot(server: "GatewayServer", now: float) -> list[dict[str, Any]]:
    sessions = []
    for s in sorted(server.sessions, key=lambda s: s.opened_at):
        sessions.append({
            "protocol": s.listener.protocol,
            "user": s.user,
            "peer": s.peer,
            "tls": s.tls_active,
            "state": "authenticated" if s.user else "connected",
            "upstream": "connected" if s.user else None,
            "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out,
            "opened_at": round(s.opened_at, 3),
            "duration": round(max(0.0, now - s.opened_at), 1),
        })
    return sessions


async def accounts_snapshot(server: "GatewayServer", activity: AccountActivity) -> list[dict[str, Any]]:
    config = server.config
    manager = server.ctx.accounts
    stored = await trio.to_thread.run_sync(_read_store, server.ctx.store, list(config.users))
    grants = await trio.to_thread.run_sync(_send_scope_problems, server)
    accounts = []
    for name, user in sorted(config.users.items()):
        provider = config.providers.get(user.provider)
        record = stored.get(name, {})
        accounts.append({
            "name": name,
            "upstream_user": user.upstream_user,
            "provider": user.provider,
            "flow": provider.flow if provider else None,
            "authorized": record.get("authorized", False),
            "status": record.get("state"),
            "status_detail": record.get("detail"),
            "token_valid_until": _token_valid_until(manager, name),
            "last_refresh": activity.last_refresh.get(name),
            "last_error": activity.last_error.get(name),
            "sending_problem": _sending_problem(server, name) or grants.get(name),
        })
    return accounts


def _send_scope_problems(server: "GatewayServer") -> dict[str, dict[str, Any]]:
    """Blocking: run in a thread. Accounts whose stored grant cannot send ("re-authorize to
    send"), when an SMTP listener is configured."""
    config = server.config
    if not any(lst.protocol == "smtp" for lst in config.listeners):
        return {}
    out = {}
    for name, user in config.users.items():
        provider = config.providers.get(user.provider)
        try:
            problem = send_scope_problem(server.ctx.store, name, provider) if provider else None
        except Exception:  # a broken store must not break the status page
            problem = None
        if problem:
            out[name] = {"key": "reauthorize_to_send", "reply": "-", "advice": problem, "time": None}
    return out


def _sending_problem(server: "GatewayServer", name: str) -> dict[str, Any] | None:
    """The last explained answer of the provider's SMTP server for ``name`` (with advice)."""
    problem = server.ctx.smtp.problems.get(name) if server.ctx.smtp is not None else None
    if problem is None:
        return None
    return {"key": problem.key, "reply": problem.reply, "advice": problem.advice,
            "time": round(problem.when, 3)}


def _read_store(store: "CredentialStore", names: list[str]) -> dict[str, dict[str, Any]]:
    """Blocking: run in a thread. Only public, non-secret fields are copied out."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            record = store.account(name)
            status = store.status(name)
        except Exception:  # a broken store must not break the status page
            out[name] = {"state": "store_unreadable"}
            continue
        out[name] = {
            "authorized": record is not None,
            "state": status.state if status else None,
            "detail": status.detail if status else None,
        }
    return out


def _token_valid_until(manager: "Accounts", name: str) -> float | None:
    """Wall-clock expiry of the cached access token, if the account is running and has one."""
    account = manager.view(name)
    valid_until = account.token_valid_until() if account is not None else None
    return round(valid_until, 1) if valid_until is not None else None


async def snapshot(
    server: "GatewayServer", listeners: "list[ListenerConfig]", activity: AccountActivity
) -> dict[str, Any]:
    now = time.time()
    config = server.config
    return {
        "gateway": {
            "version": __version__,
            "hostname": config.server.hostname,
            "started_at": round(server.started_at, 3),
            "uptime": round(now - server.started_at, 1),
            "draining": server.draining,
            "now": round(now, 3),
        },
        "listeners": listeners_snapshot(listeners, server.addresses),
        "sessions": sessions_snapshot(server, now),
        "accounts": await accounts_snapshot(server, activity),
        "events": list(server.events.recent)[-RECENT_EVENTS_SHOWN:],
    }


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
