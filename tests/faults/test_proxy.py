"""The fault proxy itself, against a tiny line server: each fault happens exactly where armed."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio
import trustme

from tests.faults.proxy import FaultProxy

GREETING = b"* OK hello\r\n"


async def line_server(stream: trio.SocketStream) -> None:
    """Greets, then answers ``TAG BIG n`` with n bytes of 'x' + CRLF and any other line with
    ``TAG OK <line>``."""
    buf = b""
    try:
        await stream.send_all(GREETING)
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                tag, _, rest = line.partition(b" ")
                if rest.startswith(b"BIG "):
                    n = int(rest[4:])
                    await stream.send_all(b"* {%d}\r\n" % n + b"x" * n + b"\r\n" + tag + b" OK\r\n")
                else:
                    await stream.send_all(tag + b" OK " + rest + b"\r\n")
    except trio.BrokenResourceError:
        pass


@pytest.fixture
async def target(nursery: trio.Nursery) -> AsyncIterator[tuple[str, int]]:
    listeners = await nursery.start(partial(trio.serve_tcp, line_server, 0, host="127.0.0.1"))
    yield listeners[0].socket.getsockname()[:2]


async def start_proxy(nursery: trio.Nursery, target: tuple[str, int], **kw: object) -> FaultProxy:
    proxy = FaultProxy(target, **kw)  # type: ignore[arg-type]
    await nursery.start(proxy.run)
    return proxy


async def connect(proxy: FaultProxy, nursery: trio.Nursery) -> trio.SocketStream:
    """A client connection to the proxy, closed when the test ends."""
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    closers.append(stream)
    return stream


closers: list[trio.abc.AsyncResource] = []


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    yield
    while closers:
        await closers.pop().aclose()


async def read_all(stream: trio.abc.Stream) -> bytes:
    out = b""
    with trio.fail_after(5):
        try:
            while data := await stream.receive_some(65536):
                out += data
        except trio.BrokenResourceError:  # TLS closed without close_notify: also an end
            pass
    return out


async def read_until(stream: trio.abc.Stream, marker: bytes, buf: bytes = b"") -> bytes:
    with trio.fail_after(5):
        while marker not in buf:
            data = await stream.receive_some(65536)
            assert data, f"closed before {marker!r}; got {buf[-200:]!r}"
            buf += data
    return buf


async def test_passes_everything_through(nursery: trio.Nursery, target: tuple[str, int]) -> None:
    proxy = await start_proxy(nursery, target)
    stream = await connect(proxy, nursery)
    await stream.send_all(b"a1 NOOP\r\na2 BIG 200000\r\n")
    buf = await read_until(stream, b"a2 OK\r\n")
    assert buf == GREETING + b"a1 OK NOOP\r\n* {200000}\r\n" + b"x" * 200000 + b"\r\na2 OK\r\n"
    await stream.aclose()
    with trio.fail_after(5):
        await proxy.wait_idle()
    assert proxy.accepted == 1 and proxy.open_connections == 0


async def test_drop_in_the_middle_of_a_literal(nursery: trio.Nursery, target: tuple[str, int]) -> None:
    proxy = await start_proxy(nursery, target)
    rule = proxy.arm("down", "drop", rb"\{\d+\}\r\n", after=1000)
    stream = await connect(proxy, nursery)
    await stream.send_all(b"a1 BIG 500000\r\n")
    got = await read_all(stream)
    assert got == GREETING + b"* {500000}\r\n" + b"x" * 1000
    assert rule.fired.is_set() and not rule.armed
    # The rule fired once: the next connection passes through.
    stream = await connect(proxy, nursery)
    await stream.send_all(b"a1 BIG 10\r\n")
    assert (await read_until(stream, b"a1 OK\r\n")).endswith(b"x" * 10 + b"\r\na1 OK\r\n")
    await stream.aclose()


async def test_drop_after_bytes_from_the_start(nursery: trio.Nursery, target: tuple[str, int]) -> None:
    proxy = await start_proxy(nursery, target)
    proxy.arm("down", "drop", None, after=5)
    stream = await connect(proxy, nursery)
    assert await read_all(stream) == GREETING[:5]


async def test_pattern_split_across_reads_is_seen(nursery: trio.Nursery, target: tuple[str, int]) -> None:
    proxy = await start_proxy(nursery, target)
    proxy.arm("down", "drop", rb"OK tail-marker", after=0)
    stream = await connect(proxy, nursery)
    await read_until(stream, GREETING)
    # The server's answer may arrive in two reads; the look-behind window joins them.
    await stream.send_all(b"a1 BIG 70000\r\nb1 tail-marker and more\r\n")
    got = await read_all(stream)
    assert got.endswith(b"a1 OK\r\nb1 OK tail-marker")


async def test_drop_when_a_command_is_seen(nursery: trio.Nursery, target: tuple[str, int]) -> None:
    proxy = await start_proxy(nursery, target)
    proxy.arm("up", "drop", rb"^\S+ UID EXPUNGE ")
    stream = await connect(proxy, nursery)
    await stream.send_all(b"a1 NOOP\r\n")
    await read_until(stream, b"a1 OK NOOP\r\n")
    await stream.send_all(b"a2 UID EXPUNGE 1:3\r\n")
    # Only "a2 UID EXPUNGE " (up to the end of the match) was forwarded: no complete command,
    # no answer, and the connection is gone.
    assert await read_all(stream) == b""


async def test_stall_keeps_the_connection_open_but_silent(
    nursery: trio.Nursery, target: tuple[str, int]
) -> None:
    proxy = await start_proxy(nursery, target)
    rule = proxy.arm("up", "stall", rb"^\S+ SELECT ")
    stream = await connect(proxy, nursery)
    await read_until(stream, GREETING)
    await stream.send_all(b"a1 SELECT INBOX\r\n")
    await rule.fired.wait()
    with trio.move_on_after(0.3) as scope:
        data = await stream.receive_some(100)
        pytest.fail(f"a stalled connection answered {data!r}")
    assert scope.cancelled_caught
    assert proxy.open_connections == 1
    await stream.aclose()  # the client gives up: the proxy notices and frees the connection
    with trio.fail_after(5):
        await proxy.wait_idle()


async def test_reply_answers_with_the_command_tag(nursery: trio.Nursery, target: tuple[str, int]) -> None:
    proxy = await start_proxy(nursery, target)
    proxy.arm("up", "reply", rb"^\S+ SELECT ",
              reply=b"{tag} NO Request is throttled. Suggested Backoff Time: 500 milliseconds\r\n")
    stream = await connect(proxy, nursery)
    got = b""
    for command, end in ((b"a1 NOOP", b"a1 OK NOOP\r\n"), (b"A7 SELECT INBOX", b"milliseconds\r\n"),
                         (b"a8 NOOP", b"a8 OK NOOP\r\n")):
        await stream.send_all(command + b"\r\n")
        got = await read_until(stream, end, got)
    assert got == (GREETING + b"a1 OK NOOP\r\n"
                   b"A7 NO Request is throttled. Suggested Backoff Time: 500 milliseconds\r\n"
                   b"a8 OK NOOP\r\n")
    await stream.aclose()


async def test_reply_and_close_like_an_expired_session(
    nursery: trio.Nursery, target: tuple[str, int]
) -> None:
    proxy = await start_proxy(nursery, target)
    proxy.arm("up", "reply", rb"^\S+ NOOP", close=True,
              reply=b"* BYE Session invalidated - AccessTokenExpired\r\n")
    stream = await connect(proxy, nursery)
    await read_until(stream, GREETING)
    await stream.send_all(b"a1 NOOP\r\n")
    assert await read_all(stream) == b"* BYE Session invalidated - AccessTokenExpired\r\n"


async def test_terminates_tls_on_both_sides(nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def tls_line_server(raw: trio.SocketStream) -> None:
        tls = trio.SSLStream(raw, server_ctx, server_side=True)
        try:
            await tls.do_handshake()
            await line_server(tls)  # type: ignore[arg-type]
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(partial(trio.serve_tcp, tls_line_server, 0, host="127.0.0.1"))
    target = listeners[0].socket.getsockname()[:2]
    proxy = await start_proxy(nursery, target, server_tls=server_ctx, client_tls=client_ctx)
    proxy.arm("up", "reply", rb"^\S+ LOGOUT", reply=b"* BYE seen in clear\r\n", close=True)
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", proxy.port, ssl_context=client_ctx
    )
    closers.append(stream)
    await stream.send_all(b"a1 NOOP\r\n")
    got = await read_until(stream, b"a1 OK NOOP\r\n")
    await stream.send_all(b"a2 LOGOUT\r\n")
    assert got + await read_all(stream) == GREETING + b"a1 OK NOOP\r\n* BYE seen in clear\r\n"
