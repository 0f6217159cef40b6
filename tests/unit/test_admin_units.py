"""The admin plane's sans-IO parts: requests, access rules, metrics text, page escaping, and
the web authorization's steps before any token request."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from gateway.admin import pages
from gateway.admin.access import AdminAccess, host_of, is_loopback_host
from gateway.admin.authorize import MAX_PENDING, WebAuthorizations, WebFlowError
from gateway.admin.metrics import LiveState, Metrics
from gateway.admin.routes import _safe_next
from gateway.admin.wire import Request, parse_cookies, parse_form
from gateway.config import AdminSection, Config
from gateway.oauth.store import open_store
from tests.fixtures.gateway import make_config


def _request(method: str = "GET", target: str = "/", peer: str = "127.0.0.1", **headers: str) -> Request:
    hdrs = {"host": "127.0.0.1:8025", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return Request(method, target, tuple(hdrs.items()), b"", peer)


# --- wire ------------------------------------------------------------------------------------


def test_request_accessors() -> None:
    req = Request(
        "POST", "/oauth/complete?x=1&x=2&y=", (
            ("host", "127.0.0.1:8025"),
            ("content-type", "application/x-www-form-urlencoded; charset=utf-8"),
            ("cookie", 'a=1; mailgate_csrf="abc"; junk'),
        ), b"password=p%26w+d&confirm=p%26w+d", "127.0.0.1",
    )
    assert req.path == "/oauth/complete"
    assert req.query == {"x": "1", "y": ""}
    assert req.cookies == {"a": "1", "mailgate_csrf": "abc"}
    assert req.form() == {"password": "p&w d", "confirm": "p&w d"}
    assert req.header("HOST") == "127.0.0.1:8025"
    assert not req.is_websocket_upgrade


def test_form_needs_the_form_content_type() -> None:
    req = Request("POST", "/", (("content-type", "application/json"),), b"a=1", "127.0.0.1")
    assert req.form() == {}


def test_websocket_upgrade_detection() -> None:
    assert _request(upgrade="WebSocket", connection="keep-alive, Upgrade").is_websocket_upgrade
    assert not _request(upgrade="h2c", connection="Upgrade").is_websocket_upgrade
    assert not _request("POST", upgrade="websocket", connection="Upgrade").is_websocket_upgrade


@given(st.dictionaries(st.text(min_size=1), st.text()))
def test_parse_form_round_trips(values: dict[str, str]) -> None:
    assert parse_form(urllib.parse.urlencode(values)) == values


@given(st.text())
def test_parse_cookies_never_fails(header: str) -> None:
    assert isinstance(parse_cookies(header), dict)


# --- access ----------------------------------------------------------------------------------


def test_loopback_names() -> None:
    for host in ("127.0.0.1", "127.5.0.1", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"):
        assert is_loopback_host(host), host
    for host in ("10.0.0.1", "0.0.0.0", "evil.example", "127.0.0.1.evil.example", ""):
        assert not is_loopback_host(host), host
    assert host_of("127.0.0.1:8025") == "127.0.0.1"
    assert host_of("[::1]:8025") == "::1"
    assert host_of("localhost") == "localhost"


def test_without_a_token_only_loopback_peers_and_hosts_are_served() -> None:
    access = AdminAccess(AdminSection(bind="127.0.0.1:8025"))
    assert access.check(_request()) is None
    assert access.check(_request(host="localhost:8025")) is None
    refused = access.check(_request(peer="192.0.2.7"))
    assert refused is not None and refused.status == 403
    # DNS rebinding: a page on evil.example re-resolved to 127.0.0.1.
    rebound = access.check(_request(host="evil.example:8025"))
    assert rebound is not None and rebound.status == 403


def test_cross_origin_posts_and_websockets_are_refused() -> None:
    access = AdminAccess(AdminSection(bind="127.0.0.1:8025"))
    assert access.check(_request("POST", origin="http://127.0.0.1:8025")) is None
    assert access.check(_request("POST")) is None  # curl sends no Origin
    for req in (
        _request("POST", origin="http://evil.example"),
        _request("POST", origin="null"),
        _request(upgrade="websocket", connection="Upgrade", origin="http://evil.example"),
    ):
        refused = access.check(req)
        assert refused is not None and refused.status == 403


def test_token_mode() -> None:
    access = AdminAccess(AdminSection(bind="0.0.0.0:8025", token=SecretStr("s3cret-admin-token")))
    page = access.check(_request(target="/metrics?x=1", host="mail.example:8025", peer="192.0.2.7"))
    assert page is not None and page.status == 303
    assert dict(page.headers)["Location"] == "/login?next=%2Fmetrics%3Fx%3D1"
    post = access.check(_request("POST", target="/oauth/complete", host="mail.example:8025"))
    assert post is not None and post.status == 401
    assert access.check(_request(target="/healthz", host="mail.example:8025")) is None
    assert access.check(_request(authorization="Bearer s3cret-admin-token")) is None
    wrong = access.check(_request(authorization="Bearer s3cret-admin-tokeX"))
    assert wrong is not None
    cookie = access.session_cookie()
    assert "s3cret-admin-token" not in cookie and "HttpOnly" in cookie
    value = cookie.split(";", 1)[0]
    assert access.check(_request(cookie=value)) is None
    assert access.check(_request(cookie=value[:-1] + "0")) is not None
    assert access.token_matches("s3cret-admin-token") and not access.token_matches("")


def test_login_next_stays_on_this_site() -> None:
    assert _safe_next("/metrics?x=1") == "/metrics?x=1"
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example", "metrics"):
        assert _safe_next(target) == "/"


# --- metrics ---------------------------------------------------------------------------------


def _live(**kw: object) -> LiveState:
    base: dict[str, object] = dict(
        sessions_by_protocol={}, bytes_in_by_protocol={}, bytes_out_by_protocol={},
        draining=False, dropped_subscribers=0, started_at=1000.0,
    )
    base.update(kw)
    return LiveState(**base)  # type: ignore[arg-type]


def _samples(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = value
    return out


def test_metrics_count_events() -> None:
    m = Metrics()
    events = [
        {"type": "session.opened", "protocol": "imap"},
        {"type": "session.authenticated", "protocol": "imap", "user": "alice"},
        {"type": "login.failed", "protocol": "pop3", "user": "bob", "reason": "bad_credentials"},
        {"type": "session.closed", "protocol": "imap", "bytes_in": 100, "bytes_out": 5000,
         "outcome": "logout"},
        {"type": "token.refreshed", "user": "alice"},
        {"type": "token.failed", "user": "bob", "reason": "temporary"},
        {"type": "upstream.connected", "user": "alice", "latency_ms": 120},
        {"type": "upstream.connected", "user": "alice", "latency_ms": 3000},
        {"type": "upstream.error", "user": "alice", "reason": "timeout"},
        {"type": "config.reloaded", "users": 3},
    ]
    for event in events:
        m(event)
    text = m.render(_live(sessions_by_protocol={"pop3": 2}, bytes_in_by_protocol={"imap": 7},
                          bytes_out_by_protocol={"imap": 11}, dropped_subscribers=1))
    s = _samples(text)
    assert s['mailgate_sessions{protocol="imap"}'] == "0"
    assert s['mailgate_sessions{protocol="pop3"}'] == "2"
    assert s['mailgate_sessions_opened_total{protocol="imap"}'] == "1"
    assert s['mailgate_sessions_closed_total{outcome="logout",protocol="imap"}'] == "1"
    assert s['mailgate_logins_total{protocol="imap",result="ok"}'] == "1"
    assert s['mailgate_logins_total{protocol="pop3",result="failed"}'] == "1"
    assert s['mailgate_login_failures_total{protocol="pop3",reason="bad_credentials"}'] == "1"
    assert s['mailgate_client_bytes_total{direction="in",protocol="imap"}'] == "107"
    assert s['mailgate_client_bytes_total{direction="out",protocol="imap"}'] == "5011"
    assert s['mailgate_token_refreshes_total{result="ok"}'] == "1"
    assert s['mailgate_token_refreshes_total{result="failed"}'] == "1"
    assert s['mailgate_token_failures_total{reason="temporary"}'] == "1"
    assert s['mailgate_upstream_connect_seconds_bucket{le="0.1"}'] == "0"
    assert s['mailgate_upstream_connect_seconds_bucket{le="0.25"}'] == "1"
    assert s['mailgate_upstream_connect_seconds_bucket{le="5"}'] == "2"
    assert s['mailgate_upstream_connect_seconds_bucket{le="+Inf"}'] == "2"
    assert s["mailgate_upstream_connect_seconds_sum"] == "3.12"
    assert s["mailgate_upstream_connect_seconds_count"] == "2"
    assert s['mailgate_upstream_errors_total{reason="timeout"}'] == "1"
    assert s["mailgate_config_reloads_total"] == "1"
    assert s["mailgate_event_subscribers_dropped_total"] == "1"
    assert "# TYPE mailgate_upstream_connect_seconds histogram" in text
    assert text.endswith("\n")


def test_metric_label_values_are_escaped() -> None:
    m = Metrics()
    m({"type": "upstream.error", "reason": 'a "quoted"\\ \nreason'})
    assert 'reason="a \\"quoted\\"\\\\ \\nreason"' in m.render(_live())


# --- pages -----------------------------------------------------------------------------------


def test_status_page_escapes_everything() -> None:
    evil = "<script>alert(1)</script>"
    snap = {
        "gateway": {"version": "1", "hostname": evil, "started_at": 0, "uptime": 5, "draining": True},
        "listeners": [{"protocol": "imap", "address": "127.0.0.1:1", "tls": "implicit"}],
        "sessions": [{"user": evil, "protocol": "imap", "peer": "127.0.0.1:2", "tls": True,
                      "state": "authenticated", "upstream": None, "bytes_in": 2048,
                      "bytes_out": 3 * 1024 * 1024, "duration": 3725}],
        "accounts": [{"name": evil, "upstream_user": evil, "provider": "p", "flow": "authorization_code",
                      "authorized": False, "status": None, "status_detail": None,
                      "token_valid_until": None, "last_error": {"type": "upstream.error",
                                                                 "reason": evil, "time": 0}}],
        "events": [{"type": evil, "user": evil, "time": 0}],
    }
    page = pages.status_page(snap)
    assert evil not in page
    assert "&lt;script&gt;" in page
    assert "3.0 MiB" in page and "2.0 KiB" in page and "1h02m" in page and "draining" in page


def test_password_form_shows_no_secret_but_its_one_time_values() -> None:
    form = pages.password_form("alice", flow_id="F1", csrf="C1", existing=False, error="bad <b>")
    assert 'name="flow" value="F1"' in form and 'name="csrf" value="C1"' in form
    assert 'name="confirm"' in form and "bad &lt;b&gt;" in form
    confirm = pages.password_form("alice", flow_id="F1", csrf="C1", existing=True)
    assert 'name="confirm"' not in confirm and "current local password" in confirm


# --- web authorization (no network: the steps before the token request) ---------------------


def _auth_config(tmp_path: Path) -> Config:
    provider = {"imap": "127.0.0.1:993", "token_url": "http://127.0.0.1:9/token",
                "client_id": "cid", "scopes": ["mail", "offline"]}
    return make_config(tmp_path, {
        "server": {"state_dir": "state"},
        "providers": {
            "web": {**provider, "flow": "authorization_code",
                    "authorize_url": "http://127.0.0.1:9/authorize?tenant=x"},
            "dev": {**provider, "flow": "device", "device_url": "http://127.0.0.1:9/device"},
        },
        "users": {"alice": {"provider": "web", "upstream_user": "alice@example.com"},
                  "bob": {"provider": "dev", "upstream_user": "bob@example.com"}},
    })


def test_web_authorization_start(tmp_path: Path) -> None:
    config = _auth_config(tmp_path)
    flows = WebAuthorizations()
    url = flows.start(config, "alice", base_url="http://127.0.0.1:8025")
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    assert url.startswith("http://127.0.0.1:9/authorize?") and query["tenant"] == "x"
    assert query["redirect_uri"] == "http://127.0.0.1:8025/oauth/callback"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["login_hint"] == "alice@example.com" and query["scope"] == "mail offline"
    assert query["client_id"] == "cid" and len(query["state"]) >= 20
    # The verifier never leaves the server.
    [entry] = flows._pending.values()
    assert entry.verifier not in url and entry.state == query["state"]

    with pytest.raises(WebFlowError, match="mailgate authorize bob") as device:
        flows.start(config, "bob", base_url="http://127.0.0.1:8025")
    assert device.value.status == 400
    with pytest.raises(WebFlowError) as unknown:
        flows.start(config, "carol", base_url="http://127.0.0.1:8025")
    assert unknown.value.status == 404
    for _ in range(MAX_PENDING - 1):
        flows.start(config, "alice", base_url="http://127.0.0.1:8025")
    with pytest.raises(WebFlowError) as full:
        flows.start(config, "alice", base_url="http://127.0.0.1:8025")
    assert full.value.status == 503


async def test_web_authorization_callback_refusals(tmp_path: Path) -> None:
    config = _auth_config(tmp_path)
    store = open_store(config)
    flows = WebAuthorizations()
    url = flows.start(config, "alice", base_url="http://127.0.0.1:8025")
    state = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["state"]
    with pytest.raises(WebFlowError, match="unknown, expired or already used"):
        await flows.callback(config, store, {"state": "forged", "code": "c"})
    with pytest.raises(WebFlowError, match=r"refused the authorization \(access_denied\)"):
        await flows.callback(config, store, {"state": state, "error": "access_denied"})
    assert len(flows) == 0  # a refused authorization is forgotten
    with pytest.raises(WebFlowError, match="unknown"):
        await flows.callback(config, store, {"state": state, "code": "c"})
