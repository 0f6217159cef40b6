"""The admin port over real sockets: routing, limits, access modes, health, the event WebSocket.

The gateway here runs with a small echo front end (as in test_server.py) so that the admin
plane is tested on its own; tests/e2e/test_admin_lab.py runs it with the real front ends, Dovecot
and the OAuth server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url, wrap_client_stream

from gateway.admin.http import serve_admin
from gateway.config import AdminSection
from gateway.app import build_context
from gateway.context import GatewayContext
from gateway.errors import ConfigError
from gateway.net import ClientStream
from gateway.server import GatewayServer

from tests.fixtures.gateway import make_config

ADMIN_TOKEN = "admin-token-for-tests-0123456789"


async def _echo(stream: ClientStream, ctx: GatewayContext) -> None:
    stream.user = "alice"
    ctx.events.publish({"type": "session.authenticated", "protocol": stream.listener.protocol,
                        "peer": stream.peer, "user": "alice"})
    while True:
        data = await stream.receive_some()
        if not data:
            return
        await stream.send_all(data)


def _config(tmp_path: Path, **admin: Any):
    raw = {
        "server": {"state_dir": "state"},
        "admin": {"bind": "127.0.0.1:0", **admin},
        "listener": [{"protocol": "pop3", "bind": "127.0.0.1:0", "tls": "none"}],
    }
    return make_config(tmp_path, raw)


async def _start(nursery: trio.Nursery, cfg) -> tuple[GatewayServer, str]:  # type: ignore[no-untyped-def]
    ctx = build_context(cfg)
    server = GatewayServer(ctx, handlers={"pop3": _echo})
    await nursery.start(server.run)
    await nursery.start(serve_admin, server)
    host, port = server.admin_address  # type: ignore[attr-defined]
    return server, f"{host}:{port}"


async def _raw(address: str, request: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    out = b""
    try:
        await stream.send_all(request)
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                out += chunk
    finally:
        await stream.aclose()
    return out


async def _upgrade(address: str, path: str, origin: str | None = None) -> bytes:
    """A WebSocket handshake request; returns what the server answered until it closed."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n" + (f"Origin: {origin}\r\n" if origin else "") + "\r\n"
    )
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        await stream.send_all(request.encode())
        with trio.fail_after(10):
            return await stream.receive_some(65536)
    finally:
        await stream.aclose()


async def test_routes_and_protective_headers(tmp_path: Path, nursery: trio.Nursery) -> None:
    server, address = await _start(nursery, _config(tmp_path))
    async with httpx.AsyncClient(base_url=f"http://{address}") as http:
        page = await http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert page.headers["cache-control"] == "no-store"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        assert '<script src="/static/status.js">' in page.text
        js = await http.get("/static/status.js")
        assert js.status_code == 200 and "new WebSocket" in js.text
        assert (await http.get("/nope")).status_code == 404
        wrong = await http.post("/metrics")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
        assert (await http.get("/authorize/nobody")).status_code == 404
        status = (await http.get("/api/status")).json()
        assert status["listeners"] == [{
            "protocol": "pop3", "bind": "127.0.0.1:0", "tls": "none",
            "address": "%s:%d" % server.addresses[0],
        }]


async def test_malformed_and_oversized_requests(tmp_path: Path, nursery: trio.Nursery) -> None:
    _, address = await _start(nursery, _config(tmp_path))
    assert (await _raw(address, b"NOT HTTP AT ALL\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    big = (b"POST /oauth/complete HTTP/1.1\r\nHost: " + address.encode() +
           b"\r\nContent-Length: 10000000\r\n\r\n")
    assert (await _raw(address, big)).startswith(b"HTTP/1.1 413 ")
    endless_head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000  # > MAX_HEAD_BYTES
    assert (await _raw(address, endless_head)).startswith(b"HTTP/1.1 400 ")
    # A client that opens a connection and says nothing is not served forever; a client that
    # leaves is fine; the admin port still answers afterwards.
    host, port = address.rsplit(":", 1)
    (await trio.open_tcp_stream(host, int(port))).socket.close()
    ok = await _raw(address, b"GET /healthz HTTP/1.1\r\nHost: " + address.encode() + b"\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 ") and ok.endswith(b"ok\n")


async def test_dns_rebinding_is_refused(tmp_path: Path, nursery: trio.Nursery) -> None:
    _, address = await _start(nursery, _config(tmp_path))
    answer = await _raw(address, b"GET /api/status HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403 ")


async def test_healthz_turns_503_while_draining(tmp_path: Path, nursery: trio.Nursery) -> None:
    cfg = make_config(tmp_path, {
        "server": {"state_dir": "state"}, "admin": {"bind": "127.0.0.1:0"},
        "listener": [{"protocol": "pop3", "bind": "127.0.0.1:0", "tls": "none"}],
        "limits": {"shutdown_grace": 30},
    })
    server, address = await _start(nursery, cfg)
    client = await trio.open_tcp_stream(*server.addresses[0])
    async with httpx.AsyncClient(base_url=f"http://{address}") as http:
        assert (await http.get("/healthz")).status_code == 200
        server.shutdown()
        health = await http.get("/healthz")
        assert health.status_code == 503 and health.text == "draining\n"
        metrics = await http.get("/metrics")
        assert "mailgate_draining 1" in metrics.text
    await client.aclose()


async def test_refuses_to_start_reachable_without_a_token(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    open_admin = AdminSection.model_construct(bind="0.0.0.0:0", enabled=True, token=None)
    cfg = cfg.model_copy(update={"admin": open_admin})
    server = GatewayServer(build_context(cfg))
    with pytest.raises(ConfigError, match="admin.token"):
        await serve_admin(server)


async def test_token_mode_needs_the_token(tmp_path: Path, nursery: trio.Nursery) -> None:
    _, address = await _start(nursery, _config(tmp_path, token=ADMIN_TOKEN))
    async with httpx.AsyncClient(base_url=f"http://{address}") as http:
        assert (await http.get("/healthz")).status_code == 200
        login = await http.get("/metrics")
        assert login.status_code == 303 and login.headers["location"].startswith("/login?next=")
        assert (await http.get("/metrics", headers={"Authorization": "Bearer nope"})).status_code == 303
        bearer = await http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert bearer.status_code == 200 and "mailgate_up 1" in bearer.text
        form = await http.get("/login?next=/api/status")
        assert form.status_code == 200 and ADMIN_TOKEN not in form.text
        bad = await http.post("/login", data={"token": "wrong", "next": "/api/status"})
        assert bad.status_code == 403 and "set-cookie" not in bad.headers
        good = await http.post("/login", data={"token": ADMIN_TOKEN, "next": "/api/status"})
        assert good.status_code == 303 and good.headers["location"] == "/api/status"
        assert ADMIN_TOKEN not in good.headers["set-cookie"]
        # httpx keeps the cookie: the browser path works from now on.
        assert (await http.get("/api/status")).status_code == 200
    assert (await _upgrade(address, "/events")).startswith(b"HTTP/1.1 401 ")


async def test_events_websocket_delivers_events_in_order(tmp_path: Path, nursery: trio.Nursery) -> None:
    server, address = await _start(nursery, _config(tmp_path))
    async with open_websocket_url(f"ws://{address}/events") as ws:
        client = await trio.open_tcp_stream(*server.addresses[0])
        await client.send_all(b"hello")
        assert await client.receive_some(100) == b"hello"
        await client.aclose()
        received = []
        with trio.fail_after(10):
            while len(received) < 3:
                received.append(json.loads(await ws.get_message()))
    assert [e["type"] for e in received] == ["session.opened", "session.authenticated", "session.closed"]
    assert [e["seq"] for e in received] == list(range(received[0]["seq"], received[0]["seq"] + 3))
    assert received[2]["bytes_in"] == 5 and received[2]["bytes_out"] == 5
    assert received[2]["user"] == "alice"


async def test_cross_site_websocket_is_refused(tmp_path: Path, nursery: trio.Nursery) -> None:
    _, address = await _start(nursery, _config(tmp_path))
    # (Raw requests: trio-websocket's client leaks its socket when a handshake is refused.)
    refused = await _upgrade(address, "/events", origin="http://evil.example")
    assert refused.startswith(b"HTTP/1.1 403 ")
    assert (await _upgrade(address, "/not-events")).startswith(b"HTTP/1.1 404 ")
    same_site = await _upgrade(address, "/events", origin=f"http://{address}")
    assert same_site.startswith(b"HTTP/1.1 101 ")


async def test_a_stalled_event_client_is_dropped_and_slows_nobody(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    server, address = await _start(nursery, _config(tmp_path))
    host, port = address.rsplit(":", 1)
    tcp = await trio.open_tcp_stream(host, int(port))
    # (wrap_client_stream: our own TCP stream, closed below even though the server closes first,
    # where trio-websocket's client would leave its socket open.)
    async with trio.open_nursery() as ws_nursery, tcp:
        stalled = await wrap_client_stream(ws_nursery, tcp, address, "/events")
        # The client never reads. Publishing does not wait for it: far more than its queue and
        # the kernel's socket buffers hold goes through at once...
        padding = "x" * 1024
        for i in range(20_000):
            server.events.publish({"type": "test.filler", "i": i, "padding": padding})
        assert server.events.dropped_subscribers == 1
        # ...and sessions keep working while it is stalled.
        client = await trio.open_tcp_stream(*server.addresses[0])
        await client.send_all(b"ping")
        with trio.fail_after(10):
            assert await client.receive_some(100) == b"ping"
        await client.aclose()
        # The stalled client, once it reads again, finds its stream closed with "try again later".
        with pytest.raises(ConnectionClosed) as closed:
            with trio.fail_after(30):
                while True:
                    await stalled.get_message()
        assert closed.value.reason.code == 1013
        ws_nursery.cancel_scope.cancel()
    async with httpx.AsyncClient(base_url=f"http://{address}") as http:
        metrics = (await http.get("/metrics")).text
    assert "mailgate_event_subscribers_dropped_total 1" in metrics
