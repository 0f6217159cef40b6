"""Incremental framer for IMAP server responses (server → client direction), sans-IO.

Theory of operation
-------------------
An IMAP server response is a line ending in CRLF, unless the line ends with a literal marker
``{n}`` (or ``~{n}`` for literal8): then exactly *n* octets follow and the response continues
with another line. :class:`ResponseFramer` is fed raw bytes as they arrive (``feed``) and
returns the events completed so far:

:class:`Response`
    A whole response. Literals up to ``literal_stream_threshold`` octets are kept and attached
    to their line, in the shape imaplib produces and imapclient's ``response_parser`` expects
    (see :meth:`Response.imaplib_data`). The first line is pre-parsed: ``kind`` (tagged,
    untagged, continuation), ``tag``, ``number`` (``* 5 FETCH``), ``keyword`` (``FETCH``, ``OK``
    …), ``status`` (OK/NO/BAD/BYE/PREAUTH), the response ``code`` (inside ``[...]``) and
    ``text``.
:class:`LiteralStart`, :class:`LiteralChunk` …, :class:`LiteralEnd`
    A literal larger than the threshold is never held in memory: its octets are handed out
    as they arrive, each chunk a slice of what was fed. The :class:`Response` that closes such
    a response has ``streamed = True`` and an empty literal in place of each streamed one.

Every event carries ``raw``: the exact wire bytes it accounts for, so that joining the ``raw``
of all events reproduces the input byte for byte (a relay can forward ``raw`` unchanged). The
events are independent of how the input was split into ``feed`` calls.

Status responses (``OK``/``NO``/``BAD``/``BYE``/``PREAUTH``) and continuation requests carry
human-readable text, never literals, so a trailing ``{5}`` there is taken as text (imaplib gets
this wrong). Lines are limited to ``max_line`` octets and a buffered response to
``max_response`` octets; a violation or an unparsable first line raises :class:`ProtocolError`,
the only exception this module raises on bad input. After an error the framer is unusable.

:func:`rewrite_capabilities` edits a ``CAPABILITY`` list (``* CAPABILITY …`` or a
``[CAPABILITY …]`` response code) in one response line; :func:`capabilities_of` reads one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

__all__ = [
    "DEFAULT_LITERAL_STREAM_THRESHOLD",
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_RESPONSE",
    "Event",
    "LiteralChunk",
    "LiteralEnd",
    "LiteralStart",
    "ProtocolError",
    "Response",
    "ResponseFramer",
    "capabilities_of",
    "rewrite_capabilities",
]

#: Literals larger than this are streamed as chunks instead of attached to their response.
DEFAULT_LITERAL_STREAM_THRESHOLD = 64 * 1024
#: Longest response line (without literals), as Dovecot's ``imap_max_line_length``.
DEFAULT_MAX_LINE = 64 * 1024
#: Most octets one response may buffer (its lines plus its attached, non-streamed literals).
DEFAULT_MAX_RESPONSE = 16 * 1024 * 1024
#: Largest literal size accepted at all (streamed literals cost no memory; this is a sanity cap).
MAX_LITERAL_SIZE = 1 << 40

STATUS_KEYWORDS = frozenset({b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"})

Kind = Literal["tagged", "untagged", "continuation"]

_CRLF = b"\r\n"
_LITERAL_MARKER = re.compile(rb"~?\{([0-9]{1,20})\}\Z")
# Tag: 1*<any ASTRING-CHAR except "+">, i.e. no SP, CTL, ( ) { % * " \ ] +
_TAG = re.compile(rb"[^\x00-\x20\x7f(){%*\"\\\]+]+\Z")
_ATOM = re.compile(rb"[^\x00-\x20\x7f(){%*\"\\\]]+\Z")
_NUMBER = re.compile(rb"[0-9]{1,10}\Z")


class ProtocolError(ValueError):
    """The server's byte stream is not a well-formed IMAP response stream (or breaks a limit)."""


@dataclass(frozen=True, slots=True)
class Response:
    """One complete server response.

    ``lines`` holds each line of the response without its CRLF; ``literals[i]`` is the literal
    that follows ``lines[i]`` (``None`` after the last line, ``b""`` for a streamed literal).
    """

    kind: Kind
    tag: bytes | None
    number: int | None
    keyword: bytes | None
    code: bytes | None
    text: bytes
    lines: tuple[bytes, ...]
    literals: tuple[bytes | None, ...]
    raw: bytes
    streamed_literals: tuple[int, ...] = ()

    @property
    def streamed(self) -> bool:
        """True if some literal of this response was handed out as chunks, not attached."""
        return bool(self.streamed_literals)

    @property
    def status(self) -> bytes | None:
        """``OK``/``NO``/``BAD``/``BYE``/``PREAUTH`` for a status response, else ``None``."""
        return self.keyword if self.keyword in STATUS_KEYWORDS else None

    @property
    def ok(self) -> bool:
        return self.keyword == b"OK"

    def imaplib_data(self) -> list[bytes | tuple[bytes, bytes]]:
        """The response as imaplib would store it, ready for imapclient's parsers.

        ``* 5 FETCH (UID 7 BODY[] {3}`` + ``abc`` + ``)`` becomes
        ``[(b"5 (UID 7 BODY[] {3}", b"abc"), b")"]``; ``* CAPABILITY A B`` becomes ``[b"A B"]``.
        A streamed literal appears as an empty one (its marker rewritten to ``{0}``).
        """
        first = self.lines[0]
        if self.kind == "untagged":
            if self.number is not None:
                rest = first[2:].split(b" ", 2)  # number, keyword, data
                head = rest[0] + (b" " + rest[2] if len(rest) > 2 else b"")
            else:
                rest = first[2:].split(b" ", 1)  # keyword, data
                head = rest[1] if len(rest) > 1 else b""
        else:
            head = first
        out: list[bytes | tuple[bytes, bytes]] = []
        for i, line in enumerate(self.lines):
            line = head if i == 0 else line
            literal = self.literals[i]
            if i in self.streamed_literals:
                line = _LITERAL_MARKER.sub(b"{0}", line)
            out.append(line if literal is None else (line, literal))
        return out


@dataclass(frozen=True, slots=True)
class LiteralStart:
    """A literal too large to buffer begins; ``line`` is the line ending in ``{size}``."""

    kind: Kind
    tag: bytes | None
    number: int | None
    keyword: bytes | None
    line: bytes
    size: int
    raw: bytes


@dataclass(frozen=True, slots=True)
class LiteralChunk:
    """Some octets of the streamed literal, in order."""

    data: bytes

    @property
    def raw(self) -> bytes:
        return self.data


@dataclass(frozen=True, slots=True)
class LiteralEnd:
    """The streamed literal is complete; the response continues with another line."""

    raw: bytes = b""


Event: TypeAlias = Response | LiteralStart | LiteralChunk | LiteralEnd


@dataclass(slots=True)
class _Head:
    """The parsed first line of the response being framed."""

    kind: Kind
    tag: bytes | None
    number: int | None
    keyword: bytes | None
    code: bytes | None
    text: bytes

    @property
    def may_have_literals(self) -> bool:
        return self.kind == "untagged" and self.keyword not in STATUS_KEYWORDS


def _parse_head(line: bytes) -> _Head:
    """Parse the first line of a response (without CRLF)."""
    if line[:1] == b"+":
        text = line[2:] if line[1:2] == b" " else line[1:]
        return _Head("continuation", None, None, None, None, text)
    first, sep, rest = line.partition(b" ")
    if not sep:
        raise ProtocolError("response line has no tag and keyword")
    number: int | None = None
    if first == b"*":
        kind: Kind = "untagged"
        tag = None
        word, _, rest = rest.partition(b" ")
        if _NUMBER.match(word):
            number = int(word)
            word, _, rest = rest.partition(b" ")
    elif _TAG.match(first):
        kind, tag = "tagged", first
        word, _, rest = rest.partition(b" ")
    else:
        raise ProtocolError("response line starts with an invalid tag")
    if not _ATOM.match(word):
        raise ProtocolError("response line has no valid keyword")
    keyword = word.upper()
    if kind == "tagged" and keyword not in (b"OK", b"NO", b"BAD"):
        raise ProtocolError("tagged response is not OK, NO or BAD")
    code: bytes | None = None
    if keyword in STATUS_KEYWORDS and rest[:1] == b"[":
        end = rest.find(b"]")
        if end >= 0:  # an unclosed "[" is taken as plain text
            code, rest = rest[1:end], rest[end + 1 :].lstrip(b" ")
    return _Head(kind, tag, number, keyword, code, rest)


@dataclass(slots=True)
class _Pending:
    """The response being framed: its lines and literals, and how much raw was emitted."""

    head: _Head
    lines: list[bytes] = field(default_factory=list)
    literals: list[bytes | None] = field(default_factory=list)
    unemitted: list[bytes] = field(default_factory=list)  # raw not yet handed out
    size: int = 0
    streamed: list[int] = field(default_factory=list)


class ResponseFramer:
    """Turns the server's byte stream into :data:`Event` objects. See the module docstring."""

    def __init__(
        self,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        literal_stream_threshold: int = DEFAULT_LITERAL_STREAM_THRESHOLD,
        max_response: int = DEFAULT_MAX_RESPONSE,
    ) -> None:
        self._max_line = max_line
        self._threshold = literal_stream_threshold
        self._max_response = max_response
        self._buf = bytearray()
        self._scan_from = 0  # where to continue looking for CRLF in _buf
        self._pending: _Pending | None = None
        self._literal_left = 0  # octets of the current literal still to come
        self._literal_streaming = False
        self._broken = False

    # ------------------------------------------------------------------ public API

    @property
    def at_boundary(self) -> bool:
        """True between responses with nothing buffered (e.g. safe to start TLS)."""
        return self._pending is None and not self._buf

    @property
    def in_response(self) -> bool:
        """True while a response has begun but not ended (EOF now would truncate it)."""
        return self._pending is not None or bool(self._buf)

    def take_unprocessed(self) -> bytes:
        """Give back every byte fed but not yet returned in an event, and reset the framer.

        For handing the connection to a byte relay. Not possible inside a streamed literal.
        """
        if self._literal_streaming:
            raise ProtocolError("cannot hand over the stream inside a streamed literal")
        pending = b"".join(self._pending.unemitted) if self._pending is not None else b""
        data = pending + bytes(self._buf)
        self._buf.clear()
        self._pending = None
        self._literal_left = 0
        self._scan_from = 0
        return data

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data`` and return the events it completes, in order."""
        if self._broken:
            raise ProtocolError("framer is unusable after an earlier protocol error")
        try:
            return self._feed(data)
        except ProtocolError:
            self._broken = True
            raise

    # ------------------------------------------------------------------ internals

    def _feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        view = memoryview(data)
        while True:
            if self._literal_left:
                if self._literal_streaming and not self._buf:
                    if not view:
                        break
                    view = self._stream_direct(view, events)
                else:
                    if view:
                        self._buf += view
                        view = view[len(view) :]
                    if not self._take_literal(events):
                        break
            else:
                if view:
                    self._buf += view
                    view = view[len(view) :]
                if not self._take_line(events):
                    break
        return events

    def _stream_direct(self, view: memoryview, events: list[Event]) -> memoryview:
        """Hand out streamed literal octets straight from the input (no buffering copy)."""
        take = min(self._literal_left, len(view))
        if take:
            events.append(LiteralChunk(bytes(view[:take])))
            self._literal_left -= take
            if not self._literal_left:
                self._finish_streamed_literal(events)
        return view[take:]

    def _take_literal(self, events: list[Event]) -> bool:
        """Consume literal octets from the buffer; return False if more input is needed."""
        pending = self._pending
        assert pending is not None
        if self._literal_streaming:
            if not self._buf:
                return False
            take = min(self._literal_left, len(self._buf))
            events.append(LiteralChunk(bytes(self._buf[:take])))
            del self._buf[:take]
            self._literal_left -= take
            if not self._literal_left:
                self._finish_streamed_literal(events)
            return True
        if len(self._buf) < self._literal_left:
            return False
        literal = bytes(self._buf[: self._literal_left])
        del self._buf[: self._literal_left]
        self._literal_left = 0
        pending.literals[-1] = literal
        pending.unemitted.append(literal)
        return True

    def _finish_streamed_literal(self, events: list[Event]) -> None:
        assert self._pending is not None
        self._pending.literals[-1] = b""
        self._literal_streaming = False
        self._scan_from = 0
        events.append(LiteralEnd())

    def _take_line(self, events: list[Event]) -> bool:
        """Consume one line from the buffer; return False if more input is needed."""
        end = self._buf.find(_CRLF, max(0, self._scan_from - 1))
        if end < 0:
            self._scan_from = len(self._buf)
            if len(self._buf) > self._max_line:
                raise ProtocolError(f"response line longer than {self._max_line} octets")
            return False
        if end > self._max_line:
            raise ProtocolError(f"response line longer than {self._max_line} octets")
        line = bytes(self._buf[:end])
        raw = bytes(self._buf[: end + 2])
        del self._buf[: end + 2]
        self._scan_from = 0

        pending = self._pending
        if pending is None:
            pending = self._pending = _Pending(_parse_head(line))
        pending.lines.append(line)
        pending.literals.append(None)
        pending.unemitted.append(raw)
        pending.size += len(raw)

        marker = _LITERAL_MARKER.search(line) if pending.head.may_have_literals else None
        if marker is None:
            events.append(self._complete(pending))
            return True
        size = int(marker.group(1))
        if size > MAX_LITERAL_SIZE:
            raise ProtocolError("literal size is out of range")
        if size <= self._threshold:
            pending.size += size
            if pending.size > self._max_response:
                raise ProtocolError(f"response larger than {self._max_response} octets")
            pending.literals[-1] = b""
            self._literal_left = size
            return True
        head = pending.head
        pending.streamed.append(len(pending.lines) - 1)
        self._literal_streaming = True
        pending.literals[-1] = b""
        self._literal_left = size
        events.append(
            LiteralStart(head.kind, head.tag, head.number, head.keyword, line, size, b"".join(pending.unemitted))
        )
        pending.unemitted.clear()
        return True

    def _complete(self, pending: _Pending) -> Response:
        self._pending = None
        if pending.size > self._max_response:
            raise ProtocolError(f"response larger than {self._max_response} octets")
        head = pending.head
        return Response(
            kind=head.kind,
            tag=head.tag,
            number=head.number,
            keyword=head.keyword,
            code=head.code,
            text=head.text,
            lines=tuple(pending.lines),
            literals=tuple(pending.literals),
            raw=b"".join(pending.unemitted),
            streamed_literals=tuple(pending.streamed),
        )


# ---------------------------------------------------------------------- CAPABILITY helpers

_CAPA_IN_CODE = re.compile(rb"\[CAPABILITY ([^\]\r\n]*)\]", re.IGNORECASE)
_CAPA_UNTAGGED = re.compile(rb"\A(\* CAPABILITY)((?: [^\r\n]*)?)(\r\n)?\Z", re.IGNORECASE)


def _rewrite_atoms(atoms: bytes, drop: tuple[bytes, ...], add: tuple[bytes, ...]) -> bytes:
    def dropped(atom: bytes) -> bool:
        up = atom.upper()
        return any(up.startswith(d) if d.endswith(b"=") else up == d for d in drop)

    kept = [a for a in atoms.split() if not dropped(a)]
    present = {a.upper() for a in kept}
    kept += [a for a in add if a.upper() not in present]
    return b" ".join(kept)


def rewrite_capabilities(line: bytes, *, drop: Iterable[bytes] = (), add: Iterable[bytes] = ()) -> bytes:
    """Return ``line`` with capabilities dropped/added; other lines come back unchanged.

    ``line`` is one response line (with or without CRLF): ``* CAPABILITY …`` or a status
    response with a ``[CAPABILITY …]`` code. ``drop`` entries match atoms case-insensitively; an
    entry ending in ``=`` drops every atom with that prefix (``b"AUTH="``, ``b"COMPRESS="``).
    ``add`` atoms are appended unless already present.
    """
    drop_t = tuple(d.upper() for d in drop)
    add_t = tuple(add)
    m = _CAPA_UNTAGGED.match(line)
    if m:
        atoms = _rewrite_atoms(m.group(2), drop_t, add_t)
        return m.group(1) + (b" " + atoms if atoms else b"") + (m.group(3) or b"")
    return _CAPA_IN_CODE.sub(lambda c: b"[CAPABILITY " + _rewrite_atoms(c.group(1), drop_t, add_t) + b"]", line, 1)


def capabilities_of(response: Response) -> frozenset[str] | None:
    """The upper-case capability atoms a response announces, or ``None`` if it announces none."""
    if response.kind == "untagged" and response.keyword == b"CAPABILITY":
        atoms = response.text
    elif response.code is not None and response.code[:11].upper() == b"CAPABILITY ":
        atoms = response.code[11:]
    else:
        return None
    return frozenset(a.decode("ascii", "replace").upper() for a in atoms.split())
