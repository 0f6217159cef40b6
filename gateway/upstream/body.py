"""One message body streamed from the upstream: ``UID FETCH`` of a body section, chunk by chunk.

Theory of operation
-------------------
:class:`BodyStream` is an async context manager and an async iterator of chunks::

    async with BodyStream(connection, uid, b"UID FETCH 7 (UID BODY.PEEK[])") as body:
        async for chunk in body: ...

Entering sends the command and reads until the body literal begins; a literal larger than the
reader's stream threshold is then handed out as the framer slices it from each read (at most
``RECEIVE_SIZE`` per chunk), never held whole; a small one arrives attached to its FETCH
response and is handed out at once. ``size`` is the literal's size once it is known. Other
responses that arrive meanwhile (an unsolicited FETCH with its own literal, EXISTS …) are
read past.

The message is gone when the tagged answer comes without a body (``OK`` with nothing, or
Dovecot's ``BODY[] NIL`` for a message expunged meanwhile) or the server says ``NO``: entering
raises :class:`MessageVanished` and the connection stays usable (its tagged answer was read).
A ``BAD`` is an :class:`~gateway.upstream.engine.UpstreamBad`.

Leaving normally drains the rest of the body and reads up to the tagged answer, so the
connection stays usable; leaving on an error or a cancellation marks the connection unusable
(the stream is at an unknown point).

It uses only the engine's public interface (``check_usable``, ``next_tag``, ``send``,
``next_event``, ``interrupted``, ``fail``).
"""

from __future__ import annotations

import logging
import re
from types import TracebackType

from ..errors import UpstreamError
from ..protocol.imap_grammar import literal_at_end
from ..protocol.imap_responses import LiteralChunk, LiteralEnd, LiteralStart, Response
from .engine import IMAPConnection, UpstreamBad

log = logging.getLogger("mailgate.upstream")

__all__ = ["BodyStream", "MessageVanished"]

# The FETCH item a body literal belongs to, just before the literal's marker.
_BODY_ITEM = re.compile(rb"(?:BODY|BINARY)\[[^\]]*\](?:<[0-9]+>)? \Z", re.IGNORECASE)


def _is_body_literal(line: bytes) -> bool:
    """Does ``line`` (a FETCH line announcing a literal) announce a body section's literal?"""
    marker = literal_at_end(line, nonsync=False)
    return marker is not None and _BODY_ITEM.search(line, 0, marker.start) is not None


class MessageVanished(UpstreamError):
    """The message asked for is no longer in the mailbox (expunged by another session)."""


class BodyStream:
    """One streamed message body: an async context manager and an async iterator of chunks."""

    def __init__(self, connection: IMAPConnection, uid: int, command: bytes):
        self._conn = connection
        self._uid = uid
        self._command = command
        self._tag = b""
        self.size: int | None = None
        self._attached: bytes | None = None  # a small body that came whole
        self._in_literal = False
        self._done = False

    async def __aenter__(self) -> BodyStream:
        conn = self._conn
        conn.check_usable()
        self._tag = conn.next_tag()
        try:
            await conn.send(self._tag + b" " + self._command + b"\r\n")
            await self._find_body()
        except MessageVanished:
            raise  # the tagged answer was read: the connection is fine
        except BaseException:
            conn.interrupted("UID FETCH")
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._done:
            return
        if exc_type is not None:
            self._conn.interrupted("UID FETCH")
            return
        try:
            async for _ in self:  # drain what the caller did not read
                pass
        except BaseException:
            self._conn.interrupted("UID FETCH")
            raise

    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        if self._attached is not None:
            data, self._attached = self._attached, None
            if data:
                return data
        while self._in_literal:
            event = await self._conn.next_event()
            if isinstance(event, LiteralChunk):
                if event.data:
                    return event.data
            elif isinstance(event, LiteralEnd):
                self._in_literal = False
        if not self._done:
            await self._finish()
        raise StopAsyncIteration

    async def _find_body(self) -> None:
        """Read until the body literal starts (or arrives whole); keep other responses aside."""
        conn = self._conn
        while True:
            event = await conn.next_event()
            if isinstance(event, LiteralStart):
                if event.keyword == b"FETCH" and _is_body_literal(event.line):
                    self.size, self._in_literal = event.size, True
                    return
                await self._skip_streamed_literal()
            elif isinstance(event, Response):
                if event.kind == "tagged" and event.tag == self._tag:
                    self._done = True
                    if event.keyword == b"OK":
                        raise MessageVanished(f"message UID {self._uid} is no longer on {conn.where}")
                    text = event.text.decode("utf-8", "replace")
                    if event.keyword == b"NO":
                        raise MessageVanished(f"message UID {self._uid} cannot be fetched: {text}")
                    raise UpstreamBad("UID FETCH", "BAD", text)
                if event.kind == "continuation":
                    raise conn.fail(f"{conn.where} asked for a continuation of UID FETCH")
                body = self._attached_body(event)
                if body is not None:
                    self.size, self._attached = len(body), body
                    return
                # BODY[] NIL (Dovecot, message expunged meanwhile): keep reading to the tagged
                # answer, which then finds no body and raises MessageVanished.

    def _attached_body(self, event: Response) -> bytes | None:
        """The body section of a whole FETCH response (a small literal or ``""``); ``None`` if
        it has none or it is ``NIL`` (how Dovecot answers for a message expunged meanwhile)."""
        if event.keyword != b"FETCH" or event.streamed:
            return None
        try:
            items = event.fetch()
        except ValueError as exc:
            raise self._conn.fail(f"{self._conn.where} sent a FETCH answer that cannot be parsed: {exc}") from None
        for key, value in items.items():
            if key.startswith((b"BODY[", b"BINARY[")):
                return value if isinstance(value, bytes) else None
        return None

    async def _skip_streamed_literal(self) -> None:
        while not isinstance(await self._conn.next_event(), LiteralEnd):
            pass

    async def _finish(self) -> None:
        """After the body: read the rest of its FETCH and everything up to the tagged answer."""
        conn = self._conn
        while True:
            event = await conn.next_event()
            if isinstance(event, LiteralStart):
                await self._skip_streamed_literal()
            elif isinstance(event, Response) and event.kind == "tagged" and event.tag == self._tag:
                self._done = True
                if event.keyword != b"OK":
                    log.warning("%s: UID FETCH %d ended with %s after the body", conn.where, self._uid,
                                event.keyword.decode() if event.keyword else "?")
                return
