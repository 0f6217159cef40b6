"""ClientStream helpers: taking buffered TLS records, the plaintext-login policy."""

from __future__ import annotations

import ssl

import trustme
import trio
import trio.testing

from gateway.config import ListenerConfig
from gateway.net import ClientStream, take_decrypted


async def _tls_pair() -> tuple[trio.SSLStream, trio.SSLStream]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    a, b = trio.testing.memory_stream_pair()
    server = trio.SSLStream(a, server_ctx, server_side=True)
    client = trio.SSLStream(b, client_ctx, server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return server, client


async def test_take_decrypted_returns_the_records_already_buffered() -> None:
    server, client = await _tls_pair()
    records = [bytes([65 + i]) * 4096 for i in range(6)]
    for record in records:  # six separate TLS records
        await server.send_all(record)
    first = await client.receive_some(65536)
    assert first == records[0]  # trio hands out one record per call...
    rest = take_decrypted(client, 65536)
    assert first + rest == b"".join(records)  # ...the others were already there, whole
    assert take_decrypted(client, 65536) == b""  # nothing more, and no blocking


async def test_take_decrypted_respects_the_limit_and_leaves_the_rest() -> None:
    server, client = await _tls_pair()
    for i in range(4):
        await server.send_all(bytes([97 + i]) * 1000)
    first = await client.receive_some(65536)
    more = take_decrypted(client, 1500)
    assert len(more) == 1500
    rest = take_decrypted(client, 65536)
    assert first + more + rest == b"a" * 1000 + b"b" * 1000 + b"c" * 1000 + b"d" * 1000


async def test_take_decrypted_ignores_plain_streams() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(b"hello")
    assert take_decrypted(b, 100) == b""
    assert await b.receive_some(100) == b"hello"


def _stream(peer: str, networks: list[str], tls: str = "none") -> ClientStream:
    lst = ListenerConfig(protocol="pop3", bind="127.0.0.1:0", tls=tls, plaintext_auth_from=networks)
    return ClientStream(
        trio.testing.memory_stream_pair()[0], peer=(peer, 1), listener=lst, ssl_context=None,
        handshake_timeout=1,
    )


def test_plaintext_auth_only_from_listed_networks() -> None:
    assert _stream("192.168.10.7", ["192.168.10.0/24"]).plaintext_auth_allowed()
    assert not _stream("192.168.11.7", ["192.168.10.0/24"]).plaintext_auth_allowed()
    assert not _stream("127.0.0.1", []).plaintext_auth_allowed()
    assert _stream("::ffff:10.0.0.5", ["10.0.0.5"]).plaintext_auth_allowed()
    assert _stream("::1", ["::1/128"]).plaintext_auth_allowed()
    assert not _stream("not-an-ip", ["0.0.0.0/0"]).plaintext_auth_allowed()
