"""Listeners: implicit TLS, crash isolation, connection limits, handshake deadline, shutdown.

These tests run the real GatewayServer with small test handlers in place of the IMAP/POP3 front
ends, so that the listener machinery is tested on its own; the front ends' own tests run the
whole gateway end to end.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from gateway.certs import ensure_certificate
from gateway.app import build_context
from gateway.context import GatewayContext
from gateway.net import ClientStream
from gateway.server import GatewayServer

from tests.fixtures.gateway import client_ssl_context, make_config


def _config(tmp_path: Path, **limits: object):
    raw = {
        "server": {"hostname": "mail.example.lan", "state_dir": "state"},
        "listener": [
            {"protocol": "imap", "bind": "127.0.0.1:0", "tls": "implicit"},
            {"protocol": "pop3", "bind": "127.0.0.1:0", "tls": "none"},
        ],
        "limits": limits,
    }
    cfg = make_config(tmp_path, raw)
    ensure_certificate(cfg.tls.cert_file, cfg.tls.key_file, cfg.server.hostname)
    return cfg


async def _greeter(stream: ClientStream, ctx: GatewayContext) -> None:
    await stream.send_all(b"hello tls=%d\r\n" % stream.tls_active)
    while True:
        data = await stream.receive_some()
        if not data:
            return
        if data.startswith(b"crash"):
            raise RuntimeError("handler bug")
        await stream.send_all(data)


async def _start(nursery: trio.Nursery, cfg, handler=_greeter) -> GatewayServer:
    ctx = build_context(cfg)
    server = GatewayServer(ctx, handlers={"imap": handler, "pop3": handler})
    await nursery.start(server.run)
    return server


async def _recv_line(stream: trio.abc.Stream) -> bytes:
    buf = b""
    with trio.fail_after(5):
        while not buf.endswith(b"\n"):
            chunk = await stream.receive_some(1024)
            if not chunk:
                break
            buf += chunk
    return buf


async def test_implicit_tls_listener_verifies_strictly(tmp_path: Path, nursery: trio.Nursery) -> None:
    cfg = _config(tmp_path)
    server = await _start(nursery, cfg)
    host, port = server.addresses[0]
    tcp = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(tcp, client_ssl_context(cfg), server_hostname="mail.example.lan")
    assert await _recv_line(stream) == b"hello tls=1\r\n"
    await stream.send_all(b"ping\r\n")
    assert await _recv_line(stream) == b"ping\r\n"
    await stream.aclose()


async def test_a_crashing_session_does_not_stop_the_listener(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _config(tmp_path)
    server = await _start(nursery, cfg)
    host, port = server.addresses[1]
    for _ in range(3):
        s = await trio.open_tcp_stream(host, port)
        assert await _recv_line(s) == b"hello tls=0\r\n"
        await s.send_all(b"crash\r\n")
        assert await _recv_line(s) == b""  # closed by the server
        await s.aclose()
    s = await trio.open_tcp_stream(host, port)
    assert await _recv_line(s) == b"hello tls=0\r\n"
    await s.aclose()
    assert "pop3 session from 127.0.0.1" in caplog.text and "RuntimeError: handler bug" in caplog.text
    assert server.active <= 1


async def test_per_ip_connection_limit(tmp_path: Path, nursery: trio.Nursery) -> None:
    cfg = _config(tmp_path, max_connections_per_ip=2)
    server = await _start(nursery, cfg)
    host, port = server.addresses[1]
    first = [await trio.open_tcp_stream(host, port) for _ in range(2)]
    for s in first:
        assert await _recv_line(s) == b"hello tls=0\r\n"
    third = await trio.open_tcp_stream(host, port)
    assert await _recv_line(third) == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    await first[0].aclose()
    await third.aclose()
    with trio.fail_after(5):
        while server.active > 1:
            await trio.sleep(0.01)
    fourth = await trio.open_tcp_stream(host, port)
    assert await _recv_line(fourth) == b"hello tls=0\r\n"
    for s in (first[1], fourth):
        await s.aclose()


async def test_a_client_that_never_finishes_the_handshake_is_dropped(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cfg = _config(tmp_path, tls_handshake_timeout=0.3)
    server = await _start(nursery, cfg)
    host, port = server.addresses[0]
    silent = await trio.open_tcp_stream(host, port)
    with trio.fail_after(10):
        assert await silent.receive_some(100) == b""
        while server.active:
            await trio.sleep(0.01)
    garbage = await trio.open_tcp_stream(host, port)
    await garbage.send_all(b"A1 LOGIN alice secret\r\n")
    with trio.fail_after(10):
        data = await garbage.receive_some(100)
    assert b"OK" not in data
    await silent.aclose()
    await garbage.aclose()


async def test_shutdown_stops_accepting_and_lets_sessions_finish(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cfg = _config(tmp_path, shutdown_grace=10)
    server = await _start(nursery, cfg)
    host, port = server.addresses[1]
    s = await trio.open_tcp_stream(host, port)
    assert await _recv_line(s) == b"hello tls=0\r\n"
    server.shutdown()
    await trio.sleep(0.1)
    with pytest.raises(OSError):
        await trio.open_tcp_stream(host, port)
    # The running session still works during the grace period...
    await s.send_all(b"still here\r\n")
    assert await _recv_line(s) == b"still here\r\n"
    # ...and the server finishes as soon as it ends.
    await s.aclose()
    with trio.fail_after(5):
        await server.finished.wait()


async def test_shutdown_grace_is_bounded(tmp_path: Path, nursery: trio.Nursery) -> None:
    cfg = _config(tmp_path, shutdown_grace=0.2)
    server = await _start(nursery, cfg)
    host, port = server.addresses[1]
    s = await trio.open_tcp_stream(host, port)
    assert await _recv_line(s) == b"hello tls=0\r\n"
    server.shutdown()
    with trio.fail_after(5):
        await server.finished.wait()
    assert await _recv_line(s) == b""
    await s.aclose()
