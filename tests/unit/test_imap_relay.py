"""The relay driver (gateway.frontends.imap_relay) between in-memory streams: the output order
around responses it has received but not yet written, which a real server's timing rarely shows.
(End-to-end relay tests against Dovecot are in test_imap_e2e.py.)"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio
import trio.testing

from gateway.config import Limits
from gateway.frontends.imap_relay import ImapRelay


class Side:
    """One end of an in-memory stream pair that, like a socket, hands out ``bytes``; ``peer``
    makes it do as the client's ClientStream."""

    peer = "127.0.0.1:1"

    def __init__(self, stream: trio.abc.Stream):
        self._stream = stream

    async def send_all(self, data: bytes | bytearray) -> None:
        await self._stream.send_all(data)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        return bytes(await self._stream.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self._stream.aclose()


@dataclass
class FakeUpstream:
    """What the relay uses of a logged-in upstream session."""

    stream: Side
    capabilities: frozenset[str] = field(default_factory=lambda: frozenset({"IMAP4rev1", "LITERAL+"}))

    def detach(self) -> tuple[Side, bytes]:
        return self.stream, b""


async def read_until(stream: trio.abc.Stream, end: bytes) -> bytes:
    got = b""
    with trio.fail_after(5):
        while not got.endswith(end):
            got += await stream.receive_some(65536)
    return got


async def test_refused_answer_waits_for_a_batched_tagged_answer(nursery: trio.Nursery) -> None:
    """A tagged answer the relay has received but still holds (its batch ends inside the next
    response) is written before mailgate's BAD for a command the client sent after it."""
    client, client_side = trio.testing.memory_stream_pair()
    upstream, upstream_side = trio.testing.memory_stream_pair()
    relay = ImapRelay(Side(client_side), FakeUpstream(Side(upstream_side)), limits=Limits())  # type: ignore[arg-type]
    nursery.start_soon(relay.run)

    await client.send_all(b"a NOOP\r\n")
    assert await read_until(upstream, b"\r\n") == b"a NOOP\r\n"
    await upstream.send_all(b"a OK done\r\n* 1 FETCH (BODY[] {10}\r\nabc")
    await trio.testing.wait_all_tasks_blocked()
    await client.send_all(b"x STARTTLS\r\n")  # nothing in flight: its BAD is due at once
    await trio.testing.wait_all_tasks_blocked()
    await upstream.send_all(b"defghij)\r\n")
    assert await read_until(client, b"login.\r\n") == (
        b"a OK done\r\n* 1 FETCH (BODY[] {10}\r\nabcdefghij)\r\n"
        b"x BAD STARTTLS is not available after login.\r\n"
    )
    await client.send_all(b"l LOGOUT\r\n")
    assert await read_until(upstream, b"\r\n") == b"l LOGOUT\r\n"
    assert relay.state.logout_sent and relay.state.upstream_owes
