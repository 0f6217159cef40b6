"""The upstream IMAP client: one authenticated connection to the provider's IMAP server.

Theory of operation
-------------------
:class:`UpstreamIMAP` is a thin trio driver around the sans-IO
:class:`~gateway.protocol.imap_responses.ResponseFramer`. It sends one tagged command at a time
(``M1``, ``M2`` …) and reads framer events until the tagged answer arrives; untagged responses
seen meanwhile are collected on the :class:`UpstreamResponse` (unsolicited ``EXISTS`` / ``FETCH``
included). Every read has a deadline (``limits.upstream_command_timeout``, per read, so a long
FETCH that keeps moving is fine and a silent server is not); connecting, TLS and the greeting
share ``limits.upstream_connect_timeout``. Reads are ``RECEIVE_SIZE`` (64 KiB).

Errors:

* connection refused / reset / closed, a deadline, a TLS failure or a byte stream that is not
  IMAP → :class:`~gateway.errors.UpstreamError` (a ``TemporaryFailure``) with a readable
  message (the text of a preceding ``* BYE`` included, e.g. ``AccessTokenExpired``);
  afterwards the connection is unusable and every call raises ``UpstreamError`` again;
* a tagged ``NO`` / ``BAD`` to one of the high-level methods → :class:`CommandFailed`
  (``UpstreamNo`` / ``UpstreamBad``, also ``UpstreamError``\\ s) carrying the server's text;
  ``command()`` itself returns the :class:`UpstreamResponse` and leaves checking to the caller
  (``response.check()``);
* :meth:`stream_body` of a message that is gone → :class:`MessageVanished`.

Bodies are never buffered whole: :meth:`stream_body` hands out the literal as the framer slices
it from each read (at most ``RECEIVE_SIZE`` per chunk). A caller that leaves the ``async with``
early after an error makes the connection unusable (the rest of the literal was not read); a
caller that leaves normally has the remaining bytes drained so the connection stays usable.

For the IMAP relay after login, :meth:`detach` hands over the raw trio stream plus any bytes
already read but not yet consumed; closing that stream also releases the connection's slot.

A command that ends without its tagged answer (an error, or a cancellation from the caller's
deadline) leaves the stream at an unknown point: the connection is then marked unusable.

Additions to the shared contract (nothing was renamed):

* ``stream_body(...)`` returns a :class:`BodyStream`: ``async with`` it, then ``async for``
  the chunks; ``body.size`` is the literal's size;
* ``command()`` returns the :class:`UpstreamResponse` on ``NO``/``BAD`` too (``.check()``
  raises); ``select(..., readonly=True)`` is EXAMINE;
* ``detach()`` → ``(stream, buffered_bytes)`` for the IMAP relay;
* errors: :class:`CommandFailed` (:class:`UpstreamNo`, :class:`UpstreamBad`; ``.backoff``
  for Microsoft throttling) and :class:`MessageVanished`, all ``UpstreamError`` subclasses;
* ``uid_expunge`` without UIDPLUS falls back to a plain ``EXPUNGE`` (callers that must not
  remove other clients' ``\\Deleted`` messages check ``"UIDPLUS" in capabilities`` first).
"""

from __future__ import annotations

import functools
import logging
import re
import socket
import ssl
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import trio
from imapclient import imap_utf7
from imapclient.exceptions import ProtocolError as ParserError
from imapclient.response_parser import parse_fetch_response, parse_response

from ..errors import UpstreamError
from ..net import take_decrypted
from ..protocol.imap_responses import (
    LiteralChunk,
    LiteralEnd,
    LiteralStart,
    ProtocolError,
    Response,
    ResponseFramer,
    capabilities_of,
)
from .proxy import open_tunnel

log = logging.getLogger("mailgate.upstream")

__all__ = [
    "CommandFailed",
    "MailboxInfo",
    "MessageVanished",
    "RECEIVE_SIZE",
    "UpstreamBad",
    "UpstreamIMAP",
    "UpstreamNo",
    "UpstreamResponse",
    "connect",
]

#: Bytes asked for per read (a TLS read returns at most one 16 KiB record anyway).
RECEIVE_SIZE = 64 * 1024
#: Distinct upstream CA files whose TLS contexts are kept (one per provider in practice).
TLS_CONTEXT_CACHE_SIZE = 16
#: Literals up to this size are attached to their response; larger ones are streamed.
LITERAL_STREAM_THRESHOLD = 64 * 1024
#: Largest streamed literal ``command()`` will reassemble (bodies belong in ``stream_body``).
MAX_COMMAND_LITERAL = 16 * 1024 * 1024
#: How long a polite LOGOUT may take before the connection is simply closed.
LOGOUT_TIMEOUT = 5.0
#: Longest UID set written into one command (servers limit command lines; Dovecot 64 KiB).
MAX_UID_SET_CHARS = 8000

_THROTTLED = re.compile(rb"Suggested Backoff Time: *([0-9]+) *milliseconds", re.IGNORECASE)
_BODY_LITERAL = re.compile(rb"(?:BODY|BINARY)\[[^\]]*\](?:<[0-9]+>)? ~?\{[0-9]+\}\Z", re.IGNORECASE)


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


class MessageVanished(UpstreamError):
    """The message asked for is no longer in the mailbox (expunged by another session)."""


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


@dataclass(frozen=True, slots=True)
class MailboxInfo:
    """What SELECT told about a mailbox."""

    name: str
    exists: int
    uidvalidity: int | None
    uidnext: int | None
    flags: tuple[str, ...] = ()
    permanent_flags: tuple[str, ...] = ()
    read_only: bool = False


class SlotLike(Protocol):
    def release(self) -> None: ...


# ---------------------------------------------------------------------- helpers


def quote_mailbox(name: str) -> bytes:
    """A mailbox name as an IMAP quoted string (modified UTF-7 for non-ASCII, RFC 3501 §5.1.3)."""
    encoded = imap_utf7.encode(name)
    if any(c in encoded for c in b"\r\n\x00"):
        raise ValueError("mailbox name contains CR, LF or NUL")
    return b'"' + encoded.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def uid_set(uids: Iterable[int]) -> bytes:
    """A compact UID set: ``[1, 2, 3, 7]`` → ``b"1:3,7"``."""
    ordered = sorted(set(uids))
    if not ordered or ordered[0] < 1:
        raise ValueError("a UID set needs at least one UID, all positive")
    ranges: list[bytes] = []
    start = prev = ordered[0]
    for uid in ordered[1:] + [0]:
        if uid == prev + 1:
            prev = uid
            continue
        ranges.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
        start = prev = uid
    return b",".join(ranges)


def _uid_batches(uids: Iterable[int]) -> list[bytes]:
    """UID sets each short enough for one command line."""
    batches: list[bytes] = []
    for part in uid_set(uids).split(b","):
        if batches and len(batches[-1]) + 1 + len(part) <= MAX_UID_SET_CHARS:
            batches[-1] += b"," + part
        else:
            batches.append(part)
    return batches


def make_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify the upstream against the system CAs, or only ``ca_file`` when one is set.

    Contexts are shared by every connection with the same CA file (and modification time):
    building one parses every CA certificate, which with the system store took about 200 ms
    of CPU on the benchmark machine -- on the event loop, for every upstream login
    (docs/performance.md)."""
    try:
        mtime = ca_file.stat().st_mtime_ns if ca_file else None
    except OSError:
        return _new_tls_context(ca_file)  # raises the usual, clear error
    return _cached_tls_context(ca_file, mtime)


def _new_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@functools.lru_cache(maxsize=TLS_CONTEXT_CACHE_SIZE)
def _cached_tls_context(ca_file: Path | None, mtime: int | None) -> ssl.SSLContext:
    return _new_tls_context(ca_file)


def _tls_failure(exc: BaseException, where: str) -> UpstreamError:
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return UpstreamError(f"TLS certificate of {where} is not trusted: {cause.verify_message}")
    if cause is not None:
        return UpstreamError(f"TLS handshake with {where} failed: {cause.reason or cause}")
    return UpstreamError(f"TLS handshake with {where} failed: connection closed")


def _command_name(cmd: bytes) -> str:
    """``b"UID FETCH 1:* ..."`` → ``"UID FETCH"``; ``b"SELECT x"`` → ``"SELECT"`` (for messages)."""
    words = cmd.split(b" ", 2)
    count = 2 if words[0].upper() == b"UID" and len(words) > 1 else 1
    return b" ".join(words[:count]).decode("ascii", "replace").upper()


def _flags(value: Any) -> tuple[str, ...]:
    if not isinstance(value, tuple):
        return ()
    return tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value)


# ---------------------------------------------------------------------- the slot-releasing stream


class DetachedStream(trio.abc.Stream):
    """The upstream byte stream handed to the IMAP relay; ``aclose`` also frees the slot."""

    def __init__(self, stream: trio.abc.Stream, slot: SlotLike | None):
        self._stream = stream
        self._slot = slot

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        limit = max_bytes or RECEIVE_SIZE
        data = await self._stream.receive_some(limit)
        if data and len(data) < limit:
            data += take_decrypted(self._stream, limit - len(data))
        return data

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._slot is not None:
                self._slot.release()
                self._slot = None


# ---------------------------------------------------------------------- the client


class UpstreamIMAP:
    """One upstream IMAP connection. Create with :func:`connect`, then authenticate."""

    def __init__(self, stream: trio.abc.Stream, *, where: str, command_timeout: float, max_line: int):
        self._stream = stream
        self.where = where
        self._timeout = command_timeout
        self._max_line = max_line
        self._framer = self._new_framer()
        self._events: deque[Any] = deque()
        self._tag = 0
        self._broken: str | None = None
        self._closed = False
        self._bye: str | None = None
        self.slot: SlotLike | None = None
        self.capabilities: frozenset[str] = frozenset()
        self.greeting: Response | None = None
        self.selected: MailboxInfo | None = None

    def _new_framer(self) -> ResponseFramer:
        return ResponseFramer(max_line=self._max_line, literal_stream_threshold=LITERAL_STREAM_THRESHOLD)

    # ------------------------------------------------------------------ low level I/O

    def _fail(self, message: str) -> UpstreamError:
        if self._bye and self._bye not in message:
            message = f"{message} (server said: BYE {self._bye})"
        self._broken = self._broken or message
        return UpstreamError(message)

    def _check_usable(self) -> None:
        if self._closed:
            raise UpstreamError(f"connection to {self.where} is closed")
        if self._broken:
            raise UpstreamError(self._broken)

    async def _send(self, data: bytes) -> None:
        try:
            with trio.fail_after(self._timeout):
                await self._stream.send_all(data)
        except trio.TooSlowError:
            raise self._fail(f"{self.where} did not accept data within {self._timeout:g}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._fail(f"connection to {self.where} lost while sending: {exc or type(exc).__name__}") from None

    async def _next_event(self) -> Any:
        """The next framer event, reading more from the server as needed (with a deadline)."""
        while not self._events:
            data = b""
            try:
                # A bare CancelScope: this runs once per TLS record of a big FETCH.
                with trio.CancelScope(deadline=trio.current_time() + self._timeout) as scope:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                if data and len(data) < RECEIVE_SIZE:  # more whole TLS records, without waiting
                    data += take_decrypted(self._stream, RECEIVE_SIZE - len(data))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self._fail(f"connection to {self.where} lost: {exc or type(exc).__name__}") from None
            if scope.cancelled_caught:
                raise self._fail(f"{self.where} did not answer within {self._timeout:g}s")
            if not data:
                what = "in the middle of a response" if self._framer.in_response else "unexpectedly"
                raise self._fail(f"{self.where} closed the connection {what}")
            try:
                self._events.extend(self._framer.feed(data))
            except ProtocolError as exc:
                raise self._fail(f"{self.where} sent something that is not IMAP: {exc}") from None
        event = self._events.popleft()
        if isinstance(event, Response) and event.keyword == b"BYE":
            self._bye = event.text.decode("utf-8", "replace")
        return event

    async def _next_response(self, *, max_literal: int = MAX_COMMAND_LITERAL) -> Response:
        """The next whole response; streamed literals are reassembled (up to ``max_literal``)."""
        event = await self._next_event()
        if isinstance(event, Response):
            return event
        if not isinstance(event, LiteralStart):  # pragma: no cover - framer guarantees order
            raise self._fail("response framing out of order")
        pieces: dict[int, bytes] = {}
        while True:
            if isinstance(event, LiteralStart):
                if event.size > max_literal:
                    raise self._fail(f"a {event.size}-byte literal is too large for a command answer")
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
            event = await self._next_event()

    def _next_tag(self) -> bytes:
        self._tag += 1
        return b"M%d" % self._tag

    # ------------------------------------------------------------------ commands

    async def command(self, cmd: bytes) -> UpstreamResponse:
        """Send one command (no literals, no CRLF) and collect everything up to its tagged answer."""
        self._check_usable()
        if b"\r" in cmd or b"\n" in cmd:
            raise ValueError("an upstream command must be a single line")
        tag = self._next_tag()
        name = _command_name(cmd)
        try:
            await self._send(tag + b" " + cmd + b"\r\n")
            return await self._collect(tag, name)
        except BaseException:
            self._interrupted(name)
            raise

    def _interrupted(self, name: str) -> None:
        """A command ended without its tagged answer (error or cancellation): the stream is
        now at an unknown point, so the connection must not be used again."""
        self._broken = self._broken or f"the upstream connection is unusable after an interrupted {name}"

    async def _collect(self, tag: bytes, name: str) -> UpstreamResponse:
        untagged: list[Response] = []
        while True:
            response = await self._next_response()
            if response.kind == "tagged" and response.tag == tag:
                return UpstreamResponse(name, response, untagged)
            if response.kind == "continuation":
                raise self._fail(f"{self.where} asked for a continuation of {name}")
            if response.kind == "tagged":
                raise self._fail(f"{self.where} answered a command that was not sent")
            untagged.append(response)

    async def read_greeting(self) -> Response:
        greeting = await self._next_response()
        if greeting.kind != "untagged" or greeting.keyword not in (b"OK", b"PREAUTH"):
            text = greeting.text.decode("utf-8", "replace")
            raise self._fail(f"{self.where} refused the connection: {text}")
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
            raise self._fail(f"{self.where} sent data after STARTTLS before the TLS handshake")
        self._stream = trio.SSLStream(self._stream, tls, server_hostname=server_hostname, https_compatible=False)
        await self._handshake()
        self._framer = self._new_framer()
        self.capabilities = frozenset()
        await self.refresh_capabilities()

    async def _handshake(self) -> None:
        assert isinstance(self._stream, trio.SSLStream)
        try:
            with trio.fail_after(self._timeout):
                await self._stream.do_handshake()
        except trio.TooSlowError:
            raise self._fail(f"TLS handshake with {self.where} timed out") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            err = _tls_failure(exc, self.where)
            self._broken = str(err)
            raise err from None

    async def authenticate_oauth(
        self, mechanism: str, initial_response: bytes, *, error_reply: bytes
    ) -> tuple[UpstreamResponse, bytes | None]:
        """AUTHENTICATE with SASL-IR when offered; answer an error challenge with ``error_reply``.

        ``initial_response`` and ``error_reply`` are base64 wire forms. The returned challenge
        (if any) is the base64 JSON error the server sent; the tagged answer follows it.
        """
        self._check_usable()
        tag = self._next_tag()
        mech = mechanism.upper().encode("ascii")
        name = f"AUTHENTICATE {mechanism.upper()}"
        sent_ir = "SASL-IR" in self.capabilities
        line = tag + b" AUTHENTICATE " + mech + (b" " + initial_response if sent_ir else b"")
        try:
            return await self._authenticate_exchange(tag, name, line, initial_response, error_reply, sent_ir)
        except BaseException:
            self._interrupted(name)
            raise

    async def _authenticate_exchange(
        self, tag: bytes, name: str, line: bytes, initial_response: bytes, error_reply: bytes, sent_ir: bool
    ) -> tuple[UpstreamResponse, bytes | None]:
        await self._send(line + b"\r\n")
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
                    await self._send(initial_response + b"\r\n")
                elif challenge is None:
                    challenge = response.text
                    await self._send(error_reply + b"\r\n")
                else:  # a server that keeps challenging: abort the exchange (RFC 3501 "*")
                    await self._send(b"*\r\n")
                continue
            if response.kind == "tagged":
                raise self._fail(f"{self.where} answered a command that was not sent")
            untagged.append(response)

    def _update_caps_after_auth(self, result: UpstreamResponse) -> None:
        caps = capabilities_of(result.tagged)
        for r in result.untagged:
            caps = capabilities_of(r) or caps
        self.capabilities = caps or frozenset()

    # ------------------------------------------------------------------ mailbox operations

    async def select(self, mailbox: str, *, readonly: bool = False) -> MailboxInfo:
        """SELECT (or EXAMINE) ``mailbox``; raises :class:`UpstreamNo` if it does not exist."""
        verb = b"EXAMINE " if readonly else b"SELECT "
        response = (await self.command(verb + quote_mailbox(mailbox))).check()
        exists = 0
        uidvalidity = uidnext = None
        flags: tuple[str, ...] = ()
        permanent: tuple[str, ...] = ()
        for r in response.untagged:
            if r.keyword == b"EXISTS" and r.number is not None:
                exists = r.number
            elif r.keyword == b"FLAGS":
                flags = _flags(_parse_or_empty(r))
            elif r.keyword == b"OK" and r.code:
                name, _, value = r.code.partition(b" ")
                name = name.upper()
                if name == b"UIDVALIDITY" and value.isdigit():
                    uidvalidity = int(value)
                elif name == b"UIDNEXT" and value.isdigit():
                    uidnext = int(value)
                elif name == b"PERMANENTFLAGS":
                    permanent = _flags(_parse_or_empty_bytes(value))
        code = (response.code or "").upper()
        info = MailboxInfo(mailbox, exists, uidvalidity, uidnext, flags, permanent,
                           read_only=readonly or code.startswith("READ-ONLY"))
        self.selected = info
        return info

    async def fetch_sizes(self) -> list[tuple[int, int]]:
        """``[(uid, rfc822_size)]`` of every message of the selected mailbox, in mailbox order."""
        if self.selected is not None and self.selected.exists == 0:
            return []
        response = (await self.command(b"UID FETCH 1:* (UID RFC822.SIZE)")).check()
        parsed = self._parse_fetches(response, uid_is_key=False)
        out = []
        for seq in sorted(parsed):
            attrs = parsed[seq]
            if b"UID" in attrs and b"RFC822.SIZE" in attrs:
                out.append((int(attrs[b"UID"]), int(attrs[b"RFC822.SIZE"])))
        return out

    async def fetch_attrs(self, uids: Iterable[int], attrs: bytes) -> dict[int, dict[bytes, Any]]:
        """``UID FETCH`` of ``attrs`` (e.g. ``b"X-GM-MSGID"``): ``{uid: {b"X-GM-MSGID": …}}``."""
        wanted = set(uids)
        if not wanted:
            return {}
        out: dict[int, dict[bytes, Any]] = {}
        for batch in _uid_batches(wanted):
            response = (await self.command(b"UID FETCH " + batch + b" (UID " + attrs + b")")).check()
            for uid, data in self._parse_fetches(response, uid_is_key=True).items():
                if uid in wanted:
                    out.setdefault(uid, {}).update(data)
        return out

    def _parse_fetches(self, response: UpstreamResponse, *, uid_is_key: bool) -> dict[int, dict[bytes, Any]]:
        data: list[Any] = []
        for r in response.data(b"FETCH"):
            data.extend(r.imaplib_data())
        if not data:
            return {}
        try:
            parsed = parse_fetch_response(data, uid_is_key=uid_is_key)
        except (ParserError, ValueError) as exc:
            raise self._fail(f"{self.where} sent a FETCH answer that cannot be parsed: {exc}") from None
        return {int(k): v for k, v in parsed.items()}

    def stream_body(
        self, uid: int, section: bytes = b"BODY.PEEK[]", partial: tuple[int, int] | None = None
    ) -> BodyStream:
        """``async with client.stream_body(uid) as body: async for chunk in body: ...``

        Chunks arrive as the server sends them; ``body.size`` is the literal's size once the
        first chunk is known. Raises :class:`MessageVanished` if the server has no such message.
        """
        item = section + (b"<%d.%d>" % partial if partial else b"")
        return BodyStream(self, uid, b"UID FETCH %d (UID %s)" % (uid, item))

    async def uid_store(self, uids: Iterable[int], flags_op: bytes) -> UpstreamResponse:
        """``UID STORE <uids> <flags_op>``, e.g. ``flags_op=b"+FLAGS.SILENT (\\\\Deleted)"``."""
        last = None
        for batch in _uid_batches(uids):
            last = (await self.command(b"UID STORE " + batch + b" " + flags_op)).check()
        assert last is not None
        return last

    async def uid_expunge(self, uids: Iterable[int]) -> UpstreamResponse:
        """Expunge exactly ``uids`` (UIDPLUS); without UIDPLUS a plain EXPUNGE is the fallback,
        which also removes other messages marked ``\\Deleted`` (as Dovecot's imapc does)."""
        uids = list(uids)
        if "UIDPLUS" not in self.capabilities:
            return (await self.command(b"EXPUNGE")).check()
        last = None
        for batch in _uid_batches(uids):
            last = (await self.command(b"UID EXPUNGE " + batch)).check()
        assert last is not None
        return last

    async def uid_move(self, uids: Iterable[int], mailbox: str) -> None:
        """Move ``uids`` to ``mailbox``: ``UID MOVE`` (RFC 6851) or COPY + STORE + EXPUNGE."""
        uids = list(uids)
        target = quote_mailbox(mailbox)
        if "MOVE" in self.capabilities:
            for batch in _uid_batches(uids):
                (await self.command(b"UID MOVE " + batch + b" " + target)).check()
            return
        for batch in _uid_batches(uids):
            (await self.command(b"UID COPY " + batch + b" " + target)).check()
        await self.uid_store(uids, b"+FLAGS.SILENT (\\Deleted)")
        await self.uid_expunge(uids)

    async def find_special_use(self, attr: str) -> str | None:
        """The name of the mailbox with special-use ``attr`` (e.g. ``"\\\\Trash"``), if any."""
        if "SPECIAL-USE" in self.capabilities:
            response = await self.command(b'LIST (SPECIAL-USE) "" "*"')
            if not response.ok:  # some servers announce SPECIAL-USE without LIST-EXTENDED
                response = await self.command(b'LIST "" "*"')
        elif "XLIST" in self.capabilities:
            response = await self.command(b'XLIST "" "*"')
        else:
            response = await self.command(b'LIST "" "*"')
        response.check()
        wanted = attr.lower()
        for r in response.untagged:
            if r.keyword not in (b"LIST", b"XLIST"):
                continue
            parsed = _parse_or_empty(r, whole=True)
            if len(parsed) < 3 or not isinstance(parsed[0], tuple):
                continue
            if any(isinstance(f, bytes) and f.decode("ascii", "replace").lower() == wanted for f in parsed[0]):
                name = parsed[2]
                raw = name if isinstance(name, bytes) else str(name).encode()
                return imap_utf7.decode(raw)
        return None

    # ------------------------------------------------------------------ ending

    async def logout(self) -> None:
        """Say LOGOUT (bounded by :data:`LOGOUT_TIMEOUT`), then close. Never raises."""
        if not self._closed and not self._broken:
            with trio.move_on_after(LOGOUT_TIMEOUT):
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

    async def __aenter__(self) -> UpstreamIMAP:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def detach(self) -> tuple[trio.abc.Stream, bytes]:
        """Hand the raw stream to a relay: ``(stream, bytes already read but not consumed)``.

        Closing the returned stream frees this connection's slot. This object is unusable
        afterwards.
        """
        self._check_usable()
        buffered = b"".join(e.raw for e in self._events) + self._framer.take_unprocessed()
        self._events.clear()
        stream = DetachedStream(self._stream, self.slot)
        self.slot = None
        self._closed = True
        return stream, buffered


def _parse_or_empty(r: Response, *, whole: bool = False) -> Any:
    """imapclient's parse of an untagged response's data; ``()`` if it cannot be parsed."""
    try:
        parsed = parse_response(r.imaplib_data())
    except (ParserError, ValueError):
        return ()
    if whole:
        return parsed
    return parsed[0] if parsed else ()


def _parse_or_empty_bytes(value: bytes) -> Any:
    try:
        parsed = parse_response([value])
    except (ParserError, ValueError):
        return ()
    return parsed[0] if parsed else ()


class BodyStream:
    """One streamed message body: an async context manager and an async iterator of chunks."""

    def __init__(self, client: UpstreamIMAP, uid: int, command: bytes):
        self._client = client
        self._uid = uid
        self._command = command
        self._tag = b""
        self.size: int | None = None
        self._attached: bytes | None = None  # a small body that came whole
        self._in_literal = False
        self._done = False

    async def __aenter__(self) -> BodyStream:
        client = self._client
        client._check_usable()
        self._tag = client._next_tag()
        try:
            await client._send(self._tag + b" " + self._command + b"\r\n")
            await self._find_body()
        except MessageVanished:
            raise  # the tagged answer was read: the connection is fine
        except BaseException:
            client._interrupted("UID FETCH")
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._done:
            return
        if exc_type is not None:
            self._client._interrupted("UID FETCH")
            return
        try:
            async for _ in self:  # drain what the caller did not read
                pass
        except BaseException:
            self._client._interrupted("UID FETCH")
            raise

    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        if self._attached is not None:
            data, self._attached = self._attached, None
            if data:
                return data
        while self._in_literal:
            event = await self._client._next_event()
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
        client = self._client
        while True:
            event = await client._next_event()
            if isinstance(event, LiteralStart):
                if event.keyword == b"FETCH" and _BODY_LITERAL.search(event.line):
                    self.size, self._in_literal = event.size, True
                    return
                await self._skip_streamed_literal()
            elif isinstance(event, Response):
                if event.kind == "tagged" and event.tag == self._tag:
                    self._done = True
                    if event.keyword == b"OK":
                        raise MessageVanished(f"message UID {self._uid} is no longer on {client.where}")
                    text = event.text.decode("utf-8", "replace")
                    if event.keyword == b"NO":
                        raise MessageVanished(f"message UID {self._uid} cannot be fetched: {text}")
                    raise UpstreamBad("UID FETCH", "BAD", text)
                if event.kind == "continuation":
                    raise client._fail(f"{client.where} asked for a continuation of UID FETCH")
                body = self._attached_body(event, client)
                if body is not None:
                    self.size, self._attached = len(body), body
                    return
                # BODY[] NIL (Dovecot, message expunged meanwhile): keep reading to the tagged
                # answer, which then finds no body and raises MessageVanished.

    @staticmethod
    def _attached_body(event: Response, client: UpstreamIMAP) -> bytes | None:
        """The body section of a whole FETCH response (a small literal or ``""``); ``None`` if
        it has none or it is ``NIL`` (how Dovecot answers for a message expunged meanwhile)."""
        if event.keyword != b"FETCH" or event.streamed:
            return None
        try:
            parsed = parse_fetch_response(event.imaplib_data(), uid_is_key=False)
        except (ParserError, ValueError) as exc:
            raise client._fail(f"{client.where} sent a FETCH answer that cannot be parsed: {exc}") from None
        for attrs in parsed.values():
            for key, value in attrs.items():
                if isinstance(key, bytes) and key.upper().startswith((b"BODY[", b"BINARY[")):
                    return value if isinstance(value, bytes) else None
        return None

    async def _skip_streamed_literal(self) -> None:
        while not isinstance(await self._client._next_event(), LiteralEnd):
            pass

    async def _finish(self) -> None:
        """After the body: read the rest of its FETCH and everything up to the tagged answer."""
        client = self._client
        while True:
            event = await client._next_event()
            if isinstance(event, LiteralStart):
                await self._skip_streamed_literal()
            elif isinstance(event, Response) and event.kind == "tagged" and event.tag == self._tag:
                self._done = True
                if event.keyword != b"OK":
                    log.warning("%s: UID FETCH %d ended with %s after the body", client.where, self._uid,
                                event.keyword.decode() if event.keyword else "?")
                return


# ---------------------------------------------------------------------- connecting


async def connect(
    host: str,
    port: int,
    *,
    tls: str = "implicit",
    ca_file: Path | None = None,
    connect_timeout: float,
    command_timeout: float,
    max_line: int = 65536,
    proxy: str | None = None,
) -> UpstreamIMAP:
    """Open a verified TLS connection (``implicit`` or ``starttls``), read the greeting and
    learn the capabilities. Everything up to here shares ``connect_timeout``. With ``proxy``
    (an ``http://`` URL) the TCP connection is a CONNECT tunnel through that proxy."""
    where = f"{host}:{port}"
    tls_ctx = make_tls_context(ca_file)
    try:
        with trio.fail_after(connect_timeout):
            tcp: trio.abc.Stream
            if proxy is not None:  # an HTTP CONNECT tunnel (gateway/upstream/proxy.py)
                tcp = await open_tunnel(proxy, host, port)
            else:
                try:
                    tcp = await trio.open_tcp_stream(host, port)
                except OSError as exc:
                    raise UpstreamError(f"cannot connect to {where}: {exc.strerror or exc}") from None
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream: trio.abc.Stream = tcp
            if tls == "implicit":
                stream = trio.SSLStream(tcp, tls_ctx, server_hostname=host, https_compatible=False)
            client = UpstreamIMAP(stream, where=where, command_timeout=command_timeout, max_line=max_line)
            try:
                if tls == "implicit":
                    await client._handshake()
                await client.read_greeting()
                if tls == "starttls":
                    await client.starttls(tls_ctx, host)
                elif not client.capabilities:
                    await client.refresh_capabilities()
            except BaseException:
                await client.aclose()
                raise
    except trio.TooSlowError:
        raise UpstreamError(f"connecting to {where} took longer than {connect_timeout:g}s") from None
    log.debug("connected to %s (%s)", where, tls)
    return client
