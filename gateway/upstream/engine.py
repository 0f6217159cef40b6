"""The upstream command engine: tags, one command at a time, tagged answers, capabilities, SASL.

Theory of operation
-------------------
:class:`IMAPConnection` is a thin trio driver around the response reader's framed mode
(:class:`~gateway.protocol.imap_responses.ResponseFramer`). It sends one tagged command at a
time (``M1``, ``M2`` …) and reads framer events until the tagged answer arrives; untagged
responses seen meanwhile are collected on the :class:`UpstreamResponse` (unsolicited ``EXISTS``
/ ``FETCH`` included). Every read has a deadline (``command_timeout``, per read, so a long FETCH
that keeps moving is fine and a silent server is not). Reads are
:data:`~gateway.upstream.transport.RECEIVE_SIZE` (64 KiB).

Errors:

* connection refused / reset / closed, a deadline, a TLS failure or a byte stream that is not
  IMAP → :class:`~gateway.errors.UpstreamError` (a ``TemporaryFailure``) with a readable
  message (the text of a preceding ``* BYE`` included, e.g. ``AccessTokenExpired``);
  afterwards the connection is unusable and every call raises ``UpstreamError`` again;
* ``command()`` returns the :class:`UpstreamResponse` on ``NO``/``BAD`` too; ``check()`` raises
  :class:`CommandFailed` (:class:`UpstreamNo` / :class:`UpstreamBad`, also ``UpstreamError``\\ s,
  ``.backoff`` for Microsoft throttling) carrying the server's text.

A command that ends without its tagged answer (an error, or a cancellation from the caller's
deadline) leaves the stream at an unknown point: the connection is then marked unusable.

The small public interface other parts of the client build on (:mod:`gateway.upstream.body`
streams a FETCH with it): :meth:`IMAPConnection.check_usable`, :meth:`~IMAPConnection.next_tag`,
:meth:`~IMAPConnection.send`, :meth:`~IMAPConnection.next_event`,
:meth:`~IMAPConnection.interrupted` and :meth:`~IMAPConnection.fail`.

:meth:`IMAPConnection.detach` hands the raw stream to the IMAP relay together with any bytes
already read but not yet consumed; closing that stream also releases the connection's slot.
"""

from __future__ import annotations

import logging
import re
import select
import ssl
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Self

import trio

from ..errors import UpstreamError
from ..protocol.imap_responses import (
    Event,
    LiteralChunk,
    LiteralEnd,
    LiteralStart,
    ProtocolError,
    Response,
    ResponseFramer,
    capabilities_of,
)
from .transport import (
    RECEIVE_SIZE,
    DetachedStream,
    SlotLike,
    more_decrypted,
    send_within,
    tls_handshake,
    wrap_tls,
)

log = logging.getLogger("mailgate.upstream")

__all__ = [
    "LITERAL_STREAM_THRESHOLD",
    "MAX_COMMAND_LITERAL",
    "CommandFailed",
    "IMAPConnection",
    "UpstreamBad",
    "UpstreamNo",
    "UpstreamResponse",
]

#: Literals up to this size are attached to their response; larger ones are streamed.
LITERAL_STREAM_THRESHOLD = 64 * 1024
#: Largest streamed literal ``command()`` will reassemble (bodies belong in ``stream_body``).
MAX_COMMAND_LITERAL = 16 * 1024 * 1024

_THROTTLED = re.compile(rb"Suggested Backoff Time: *([0-9]+) *milliseconds", re.IGNORECASE)


# ---------------------------------------------------------------------- errors


class CommandFailed(UpstreamError):
    """The upstream answered a command with a tagged NO or BAD."""

    def __init__(self, command: str, status: str, text: str, code: str | None = None):
        self.command = command
        self.status = status
        self.text = text
        self.code = code
        shown = f"[{code}] {text}" if code else text
        super().__init__(f"upstream refused {command}: {status} {shown}".rstrip())

    @property
    def backoff(self) -> float | None:
        """Seconds Microsoft 365 asks us to wait (``Suggested Backoff Time``), if it said so."""
        m = _THROTTLED.search(self.text.encode())
        return int(m.group(1)) / 1000 if m else None


class UpstreamNo(CommandFailed):
    """A tagged ``NO``: the command was understood and refused."""


class UpstreamBad(CommandFailed):
    """A tagged ``BAD``: the server did not accept the command (or the session state)."""


# ---------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """A tagged answer and the untagged responses that arrived before it."""

    command: str
    tagged: Response
    untagged: list[Response] = field(default_factory=list)

    @property
    def status(self) -> str:
        return (self.tagged.keyword or b"").decode("ascii", "replace")

    @property
    def ok(self) -> bool:
        return self.tagged.keyword == b"OK"

    @property
    def code(self) -> str | None:
        return None if self.tagged.code is None else self.tagged.code.decode("utf-8", "replace")

    @property
    def text(self) -> str:
        return self.tagged.text.decode("utf-8", "replace")

    def check(self) -> UpstreamResponse:
        """Return ``self`` if OK, else raise :class:`UpstreamNo` / :class:`UpstreamBad`."""
        if not self.ok:
            cls = UpstreamBad if self.tagged.keyword == b"BAD" else UpstreamNo
            raise cls(self.command, self.status, self.text, self.code)
        return self

    def data(self, keyword: bytes) -> list[Response]:
        """The untagged responses with ``keyword`` (e.g. ``b"FETCH"``)."""
        return [r for r in self.untagged if r.keyword == keyword]


def _command_name(cmd: bytes) -> str:
    """``b"UID FETCH 1:* ..."`` → ``"UID FETCH"``; ``b"SELECT x"`` → ``"SELECT"`` (for messages)."""
    words = cmd.split(b" ", 2)
    count = 2 if words[0].upper() == b"UID" and len(words) > 1 else 1
    return b" ".join(words[:count]).decode("ascii", "replace").upper()


# ---------------------------------------------------------------------- the engine


class IMAPConnection:
    """One upstream IMAP connection's command engine (see the module docstring)."""

    def __init__(self, stream: trio.abc.Stream, *, where: str, command_timeout: float, max_line: int):
        self._stream = stream
        self.where = where
        self._timeout = command_timeout
        self._max_line = max_line
        self._framer = self._new_framer()
        self._events: deque[Event] = deque()
        self._tag = 0
        self._broken: str | None = None
        self._closed = False
        self._bye: str | None = None
        self.slot: SlotLike | None = None
        #: Fingerprint of the access token this connection logged in with (the pool's check).
        self.credential = b""
        #: Extensions enabled for the rest of the connection (e.g. ``CONDSTORE``): the pool
        #: hands such a connection only to a session that accepts them.
        self.lasting: frozenset[str] = frozenset()
        self._ahead: list[tuple[bytes, str]] = []  # (tag, name) sent without waiting
        self.capabilities: frozenset[str] = frozenset()
        self.greeting: Response | None = None

    def _new_framer(self) -> ResponseFramer:
        return ResponseFramer(max_line=self._max_line, literal_stream_threshold=LITERAL_STREAM_THRESHOLD)

    # ------------------------------------------------------------------ the public low level

    def fail(self, message: str) -> UpstreamError:
        """Mark the connection unusable; the error to raise (with the server's BYE text)."""
        if self._bye and self._bye not in message:
            message = f"{message} (server said: BYE {self._bye})"
        self._broken = self._broken or message
        return UpstreamError(message)

    def check_usable(self) -> None:
        """Raise :class:`UpstreamError` if the connection is closed or broken."""
        if self._closed:
            raise UpstreamError(f"connection to {self.where} is closed")
        if self._broken:
            raise UpstreamError(self._broken)

    @property
    def usable(self) -> bool:
        """Open, not broken, no ``* BYE`` seen: the connection may take another command."""
        return not (self._closed or self._broken or self._bye)

    def data_waiting(self) -> bool:
        """Anything arrived that no command asked for (at rest: a ``* BYE``, a closed socket).
        Looks without reading: buffered events, a half-read response, a readable socket."""
        if self._ahead:
            return False  # the answer to a command sent ahead is expected: see settle()
        if self._events or not self._framer.at_boundary:
            return True
        stream = self._stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if not isinstance(stream, trio.SocketStream):
            return False
        try:
            readable, _, _ = select.select([stream.socket.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def interrupted(self, name: str) -> None:
        """A command ended without its tagged answer (error or cancellation): the stream is
        now at an unknown point, so the connection must not be used again."""
        self._broken = self._broken or f"the upstream connection is unusable after an interrupted {name}"

    def next_tag(self) -> bytes:
        self._tag += 1
        return b"M%d" % self._tag

    async def send(self, data: bytes) -> None:
        """Write ``data`` (a whole command line) within the command deadline."""
        try:
            await send_within(self._stream, data, self._timeout, self.where)
        except UpstreamError as exc:
            raise self.fail(str(exc)) from None

    async def next_event(self) -> Event:
        """The next framer event, reading more from the server as needed (with a deadline)."""
        while not self._events:
            data: bytes | bytearray = b""
            try:
                # A bare CancelScope: this runs once per TLS record of a big FETCH.
                with trio.CancelScope(deadline=trio.current_time() + self._timeout) as scope:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                data = more_decrypted(self._stream, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self.fail(f"connection to {self.where} lost: {exc or type(exc).__name__}") from None
            if scope.cancelled_caught:
                raise self.fail(f"{self.where} did not answer within {self._timeout:g}s")
            if not data:
                what = "in the middle of a response" if self._framer.in_response else "unexpectedly"
                raise self.fail(f"{self.where} closed the connection {what}")
            try:
                self._events.extend(self._framer.feed(bytes(data)))
            except ProtocolError as exc:
                raise self.fail(f"{self.where} sent something that is not IMAP: {exc}") from None
        event = self._events.popleft()
        if isinstance(event, Response) and event.keyword == b"BYE":
            self._bye = event.text.decode("utf-8", "replace")
        return event

    async def _next_response(self, *, max_literal: int = MAX_COMMAND_LITERAL) -> Response:
        """The next whole response; streamed literals are reassembled (up to ``max_literal``)."""
        event = await self.next_event()
        if isinstance(event, Response):
            return event
        if not isinstance(event, LiteralStart):  # pragma: no cover - framer guarantees order
            raise self.fail("response framing out of order")
        pieces: dict[int, bytes] = {}
        current = bytearray()
        while True:
            if isinstance(event, LiteralStart):
                if event.size > max_literal:
                    raise self.fail(f"a {event.size}-byte literal is too large for a command answer")
                current = bytearray()
            elif isinstance(event, LiteralChunk):
                current += event.data
            elif isinstance(event, LiteralEnd):
                pieces[len(pieces)] = bytes(current)
            elif isinstance(event, Response):
                literals = list(event.literals)
                for n, index in enumerate(event.streamed_literals):
                    literals[index] = pieces[n]
                return replace(event, literals=tuple(literals), streamed_literals=())
            event = await self.next_event()

    # ------------------------------------------------------------------ commands

    async def send_ahead(self, cmd: bytes) -> None:
        """Send ``cmd`` without waiting for its answer; the next :meth:`command` (or
        :meth:`settle`) reads the answer first. Saves a round trip when nobody waits for it."""
        self.check_usable()
        tag = self.next_tag()
        name = _command_name(cmd)
        try:
            await self.send(tag + b" " + cmd + b"\r\n")
        except BaseException:
            self.interrupted(name)
            raise
        self._ahead.append((tag, name))

    async def settle(self) -> list[UpstreamResponse]:
        """The answers to the commands sent ahead, in order (``[]`` if none)."""
        answers = []
        while self._ahead:
            tag, name = self._ahead[0]
            try:
                answers.append(await self._collect(tag, name))
            except BaseException:
                self.interrupted(name)
                raise
            self._ahead.pop(0)
        return answers

    async def command(self, cmd: bytes) -> UpstreamResponse:
        """Send one command (no literals, no CRLF) and collect everything up to its tagged answer."""
        self.check_usable()
        if b"\r" in cmd or b"\n" in cmd:
            raise ValueError("an upstream command must be a single line")
        if self._ahead:
            for answer in await self.settle():
                answer.check()
        tag = self.next_tag()
        name = _command_name(cmd)
        try:
            await self.send(tag + b" " + cmd + b"\r\n")
            return await self._collect(tag, name)
        except BaseException:
            self.interrupted(name)
            raise

    async def _collect(self, tag: bytes, name: str) -> UpstreamResponse:
        untagged: list[Response] = []
        while True:
            response = await self._next_response()
            if response.kind == "tagged" and response.tag == tag:
                return UpstreamResponse(name, response, untagged)
            if response.kind == "continuation":
                raise self.fail(f"{self.where} asked for a continuation of {name}")
            if response.kind == "tagged":
                raise self.fail(f"{self.where} answered a command that was not sent")
            untagged.append(response)

    async def read_greeting(self) -> Response:
        greeting = await self._next_response()
        if greeting.kind != "untagged" or greeting.keyword not in (b"OK", b"PREAUTH"):
            text = greeting.text.decode("utf-8", "replace")
            raise self.fail(f"{self.where} refused the connection: {text}")
        self.greeting = greeting
        self.capabilities = capabilities_of(greeting) or frozenset()
        return greeting

    async def refresh_capabilities(self) -> frozenset[str]:
        response = (await self.command(b"CAPABILITY")).check()
        for r in response.untagged:
            caps = capabilities_of(r)
            if caps is not None:
                self.capabilities = caps
        return self.capabilities

    async def starttls(self, tls: ssl.SSLContext, server_hostname: str) -> None:
        """Upgrade the plaintext connection (``STARTTLS``), then re-read the capabilities."""
        (await self.command(b"STARTTLS")).check()
        if self._events or not self._framer.at_boundary:
            raise self.fail(f"{self.where} sent data after STARTTLS before the TLS handshake")
        self._stream = wrap_tls(self._stream, tls, server_hostname)
        await self.handshake()
        self._framer = self._new_framer()
        self.capabilities = frozenset()
        await self.refresh_capabilities()

    async def handshake(self) -> None:
        """The TLS handshake of an implicit-TLS (or just upgraded) connection."""
        try:
            await tls_handshake(self._stream, self._timeout, self.where)
        except UpstreamError as exc:
            raise self.fail(str(exc)) from None

    async def authenticate_oauth(
        self, mechanism: str, initial_response: bytes, *, error_reply: bytes
    ) -> tuple[UpstreamResponse, bytes | None]:
        """AUTHENTICATE with SASL-IR when offered; answer an error challenge with ``error_reply``.

        ``initial_response`` and ``error_reply`` are base64 wire forms. The returned challenge
        (if any) is the base64 JSON error the server sent; the tagged answer follows it.
        """
        self.check_usable()
        tag = self.next_tag()
        mech = mechanism.upper().encode("ascii")
        name = f"AUTHENTICATE {mechanism.upper()}"
        sent_ir = "SASL-IR" in self.capabilities
        line = tag + b" AUTHENTICATE " + mech + (b" " + initial_response if sent_ir else b"")
        try:
            return await self._authenticate_exchange(tag, name, line, initial_response, error_reply, sent_ir)
        except BaseException:
            self.interrupted(name)
            raise

    async def _authenticate_exchange(
        self, tag: bytes, name: str, line: bytes, initial_response: bytes, error_reply: bytes, sent_ir: bool
    ) -> tuple[UpstreamResponse, bytes | None]:
        await self.send(line + b"\r\n")
        challenge: bytes | None = None
        untagged: list[Response] = []
        while True:
            response = await self._next_response()
            if response.kind == "tagged" and response.tag == tag:
                result = UpstreamResponse(name, response, untagged)
                if result.ok:
                    self._update_caps_after_auth(result)
                return result, challenge
            if response.kind == "continuation":
                if not sent_ir:
                    sent_ir = True
                    await self.send(initial_response + b"\r\n")
                elif challenge is None:
                    challenge = response.text
                    await self.send(error_reply + b"\r\n")
                else:  # a server that keeps challenging: abort the exchange (RFC 3501 "*")
                    await self.send(b"*\r\n")
                continue
            if response.kind == "tagged":
                raise self.fail(f"{self.where} answered a command that was not sent")
            untagged.append(response)

    def _update_caps_after_auth(self, result: UpstreamResponse) -> None:
        caps = capabilities_of(result.tagged)
        for r in result.untagged:
            caps = capabilities_of(r) or caps
        self.capabilities = caps or frozenset()

    # ------------------------------------------------------------------ ending

    async def logout(self, timeout: float) -> None:
        """Say LOGOUT (for at most ``timeout`` seconds: ``limits.logout_timeout``), then close.
        Never raises."""
        if not self._closed and not self._broken:
            with trio.move_on_after(timeout):
                try:
                    await self.command(b"LOGOUT")
                except UpstreamError:
                    pass
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection at once (idempotent) and free its slot."""
        if self._closed:
            return
        self._closed = True
        try:
            await trio.aclose_forcefully(self._stream)
        finally:
            if self.slot is not None:
                self.slot.release()
                self.slot = None

    def abandon(self) -> None:
        """Close at once without waiting (no task to say goodbye in) and free the slot."""
        if self._closed:
            return
        self._closed = True
        stream = self._stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if isinstance(stream, trio.SocketStream):
            stream.socket.close()
        if self.slot is not None:
            self.slot.release()
            self.slot = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def detach(self) -> tuple[DetachedStream, bytes]:
        """Hand the raw stream to a relay: ``(stream, bytes already read but not consumed)``.

        Closing the returned stream frees this connection's slot. This object is unusable
        afterwards.
        """
        self.check_usable()
        buffered = b"".join(e.raw for e in self._events) + self._framer.take_unprocessed()
        self._events.clear()
        stream = DetachedStream(self._stream, self.slot)
        self.slot = None
        self._closed = True
        return stream, buffered

    def reattach(self, stream: DetachedStream, buffered: bytes) -> None:
        """Take back what :meth:`detach` handed out, with the bytes the relay read but did not
        relay; the stream must be at a response boundary with no command outstanding."""
        self._stream, self.slot = stream.reclaim()
        self._framer = self._new_framer()
        self._events.clear()
        self._closed = False
        if buffered:
            try:
                self._events.extend(self._framer.feed(buffered))
            except ProtocolError as exc:
                self.fail(f"{self.where} sent something that is not IMAP: {exc}")
