"""gateway.tls.TLSStream against trio's own SSLStream, over a real socket pair."""

from __future__ import annotations

import ssl

import pytest
import trio
import trustme

from gateway.tls import READ_SIZE, WRITE_CHUNK, TLSStream

_OPENED: list[trio.SocketStream] = []


@pytest.fixture(autouse=True)
async def _close_sockets():  # type: ignore[no-untyped-def]
    yield
    while _OPENED:
        await trio.aclose_forcefully(_OPENED.pop())


def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


def _socket_streams() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    streams = trio.SocketStream(a), trio.SocketStream(b)
    _OPENED.extend(streams)
    return streams


async def _pair(server_is_ours: bool = True) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """(ours, theirs): a TLSStream and a trio.SSLStream, handshaken."""
    server_ctx, client_ctx = _contexts()
    a, b = _socket_streams()
    if server_is_ours:
        ours: TLSStream | trio.SSLStream[trio.SocketStream] = TLSStream(
            a, server_ctx, server_side=True)
        theirs = trio.SSLStream(b, client_ctx, server_hostname="localhost")
    else:
        ours = TLSStream(a, client_ctx, server_hostname="localhost")
        theirs = trio.SSLStream(b, server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ours.do_handshake)
        nursery.start_soon(theirs.do_handshake)
    return ours, theirs


async def _read_exactly(stream: trio.abc.Stream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(READ_SIZE)
        assert chunk, "unexpected end of stream"
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("server_is_ours", [True, False])
async def test_data_both_ways_in_order(server_is_ours: bool) -> None:
    ours, theirs = await _pair(server_is_ours)
    big = bytes(range(256)) * (3 * WRITE_CHUNK // 256 + 7)  # several write pieces
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ours.send_all, big)
        assert await _read_exactly(theirs, len(big)) == big
    await theirs.send_all(b"a1 NOOP\r\n")
    assert await ours.receive_some(100) == b"a1 NOOP\r\n"
    await ours.aclose()
    await theirs.aclose()


async def test_a_receive_takes_every_record_already_there() -> None:
    ours, theirs = await _pair()
    for n in range(5):  # five TLS records
        await theirs.send_all(b"%d" % n * 1000)
    await trio.sleep(0.05)  # all of it in our socket buffer
    data = await ours.receive_some(65536)
    assert data == b"".join(b"%d" % n * 1000 for n in range(5))
    first = await _pair()
    await first[1].send_all(b"x" * 5000)
    await trio.sleep(0.05)
    assert await first[0].receive_some(1200) == b"x" * 1200  # the limit holds
    assert await first[0].receive_some(65536) == b"x" * 3800  # the rest stays for later


async def test_close_notify_is_end_of_file_and_a_bare_close_breaks_the_stream() -> None:
    ours, theirs = await _pair()
    await theirs.aclose()  # sends close_notify
    assert await ours.receive_some() == b""
    assert await ours.receive_some() == b""

    ours, theirs = await _pair()
    assert isinstance(theirs, trio.SSLStream)
    await theirs.transport_stream.aclose()  # TCP end without close_notify
    with pytest.raises(trio.BrokenResourceError):
        await ours.receive_some()


async def test_use_after_close_and_a_waiting_reader_woken_by_close() -> None:
    ours, _theirs = await _pair()

    async def reader() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await ours.receive_some()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(0.05)
        await ours.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"x")


async def test_plaintext_before_the_handshake_fails_it() -> None:
    """Bytes a client pipelined after STARTTLS are read by OpenSSL as handshake data."""
    server_ctx, _ = _contexts()
    a, b = _socket_streams()
    await b.send_all(b"a2 LOGIN user pass\r\n")
    with pytest.raises(trio.BrokenResourceError) as caught:
        await TLSStream(a, server_ctx, server_side=True).do_handshake()
    assert isinstance(caught.value.__cause__, ssl.SSLError)
    await a.aclose()
    await b.aclose()


async def test_an_untrusted_server_fails_the_handshake_with_the_ssl_error() -> None:
    server_ctx, _ = _contexts()
    other_client = ssl.create_default_context()
    trustme.CA().configure_trust(other_client)  # a different CA
    a, b = _socket_streams()
    ours = TLSStream(a, other_client, server_hostname="localhost")
    theirs = trio.SSLStream(b, server_ctx, server_side=True)
    failure: list[BaseException] = []

    async def their_side() -> None:
        try:
            await theirs.do_handshake()
        except trio.BrokenResourceError:
            pass  # our alert ends their handshake

    async with trio.open_nursery() as nursery:
        nursery.start_soon(their_side)
        try:
            await ours.do_handshake()
        except trio.BrokenResourceError as exc:
            failure.append(exc)
    assert failure and isinstance(failure[0].__cause__, ssl.SSLCertVerificationError)
    await a.aclose()
    await b.aclose()


async def test_a_blocked_send_is_bounded_by_the_peer_reading() -> None:
    """Backpressure: a peer that does not read stops our send_all (it waits, memory stays
    bounded), and it completes once the peer reads."""
    ours, theirs = await _pair()
    payload = b"y" * (8 * 1024 * 1024)
    done = trio.Event()

    async def sender() -> None:
        await ours.send_all(payload)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.sleep(0.2)
        assert not done.is_set()  # the socket buffers are full; nobody reads
        assert await _read_exactly(theirs, len(payload)) == payload
    assert done.is_set()
