"""The one reader of IMAP server responses (server → client direction), sans-IO.

Theory of operation
-------------------
An IMAP server response is a line ending in CRLF, unless the line ends with a literal marker
``{n}`` (or ``~{n}`` for literal8): then exactly *n* octets follow and the response continues
with another line. Status responses (``OK``/``NO``/``BAD``/``BYE``/``PREAUTH``) and continuation
requests carry human-readable text, never literals, so a trailing ``{5}`` there is taken as text
(imaplib gets this wrong). Tags, atoms and literal markers follow
:mod:`gateway.protocol.imap_grammar`, and so does :class:`ProtocolError`, the only exception
this module raises on bad input.

The reader has two modes, for its two users; both are fed raw bytes as they arrive and give
the same answers however the input was split:

**Framed** (:class:`ResponseFramer`, the upstream client): ``feed`` returns the events
completed so far:

:class:`Response`
    A whole response. Literals up to ``literal_stream_threshold`` octets are kept and attached
    to their line. The first line is pre-parsed: ``kind`` (tagged, untagged, continuation),
    ``tag``, ``number`` (``* 5 FETCH``), ``keyword`` (``FETCH``, ``OK`` …), ``status``
    (OK/NO/BAD/BYE/PREAUTH), the response ``code`` (inside ``[...]``) and ``text``. Its data
    items are read on demand: :meth:`Response.values` (atoms, numbers, strings, ``NIL``,
    lists, literals) and :meth:`Response.fetch` (a FETCH response's ``{item: value}``, with a
    fast path for the plain number lists of a mailbox snapshot).
:class:`LiteralStart`, :class:`LiteralChunk` …, :class:`LiteralEnd`
    A literal larger than the threshold is never held in memory: its octets are handed out
    as they arrive, each chunk a slice of what was fed. The :class:`Response` that closes such
    a response has ``streamed = True`` and an empty literal in place of each streamed one.

Every event carries ``raw``: the exact wire bytes it accounts for, so that joining the ``raw``
of all events reproduces the input byte for byte. Lines are limited to ``max_line`` octets and
a buffered response to ``max_response`` octets; a violation or an unparsable first line raises
:class:`ProtocolError`. After an error the framer is unusable.

**Relay** (:class:`ResponseScanner`, the post-login relay): ``feed`` returns *items*, in order:
``memoryview``/``bytes`` to pass through unchanged (slices of the chunk: ordinary lines and
literal octets cost no copy and no per-byte Python work), and the events :class:`Continuation`,
:class:`Tagged` and :class:`Bye`, each carrying the bytes of its line to relay. Lines of untagged
data (``* 5 FETCH …``) take a fast path: one ``find`` for the line end and a look at its last
bytes for a literal. A partial line is held until its end arrives; a line longer than
``max_line`` is passed on in pieces (only status and capability lines must be whole; those are
short, so an overlong one is a :class:`ProtocolError`). A literal is never held: it streams.
Capability lists (``* CAPABILITY …``, ``[CAPABILITY …]`` codes) go through the scanner's
``rewrite_capability_line`` hook (the relay's policy lives in
:mod:`gateway.protocol.imap_passthrough`).

:func:`rewrite_capabilities` edits a ``CAPABILITY`` list in one response line;
:func:`capabilities_of` reads one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias, Union

from .imap_grammar import (
    STATUS_WORDS,
    ProtocolError,
    Value,
    ValueParser,
    is_atom,
    is_number,
    is_tag,
    literal_at_end,
)

__all__ = [
    "DEFAULT_LITERAL_STREAM_THRESHOLD",
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_RESPONSE",
    "Bye",
    "Continuation",
    "Event",
    "FetchItems",
    "Item",
    "LiteralChunk",
    "LiteralEnd",
    "LiteralStart",
    "ProtocolError",
    "Response",
    "ResponseFramer",
    "ResponseScanner",
    "Tagged",
    "capabilities_of",
    "rewrite_capabilities",
]

#: Literals larger than this are streamed as chunks instead of attached to their response.
DEFAULT_LITERAL_STREAM_THRESHOLD = 64 * 1024
#: Longest response line (without literals), as Dovecot's ``imap_max_line_length``.
DEFAULT_MAX_LINE = 64 * 1024
#: Most octets one response may buffer (its lines plus its attached, non-streamed literals).
DEFAULT_MAX_RESPONSE = 16 * 1024 * 1024
#: Bytes the relay scanner keeps back from a line passed on in pieces: enough to recognise
#: ``~{<20 digits>}\r\n``.
_LITERAL_TAIL: Final = 32

Kind = Literal["tagged", "untagged", "continuation"]

#: A FETCH response's items: upper-case item name (``b"UID"``, ``b"BODY[]<0>"``) → value.
FetchItems: TypeAlias = dict[bytes, Value]

_CRLF = b"\r\n"
# A FETCH answer of only numbers (a mailbox snapshot): read without the general parser.
_PLAIN_FETCH = re.compile(rb"\(((?:[A-Za-z0-9.\-]+ [0-9]+ ?)*)\)\Z")


def _marker(line: bytes) -> int | None:
    """Where the literal marker at the end of a response line starts, if it has one."""
    marker = literal_at_end(line, nonsync=False)
    return None if marker is None else marker.start


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
        return self.keyword if self.keyword in STATUS_WORDS else None

    @property
    def ok(self) -> bool:
        return self.keyword == b"OK"

    def values(self) -> tuple[Value, ...]:
        """The data items after the keyword (``* 5 FETCH (…)`` → one list; ``* LIST (…) "/" x``
        → three items), literals in their places (an empty one for a streamed literal).
        ``ValueError`` if they are malformed."""
        first = self.lines[0]
        segments = [first[len(first) - len(self.text) :]]
        segments += self.lines[1:]
        literals: list[bytes] = []
        for i, literal in enumerate(self.literals):
            if literal is None:
                continue
            cut = _marker(segments[i])
            if cut is None:  # pragma: no cover - the framer attached it after a marker
                raise ValueError("literal without a marker")
            segments[i] = segments[i][:cut]
            literals.append(literal)
        return ValueParser(segments, literals, response=True).parse()

    def fetch(self) -> FetchItems:
        """The items of a FETCH response: ``{b"UID": 7, b"FLAGS": (Atom(b"\\Seen"),), …}``.

        Item names are upper case. ``ValueError`` if this is no well-formed FETCH response.
        """
        if self.keyword != b"FETCH" or self.number is None:
            raise ValueError("not a FETCH response")
        if len(self.lines) == 1:
            plain = _PLAIN_FETCH.match(self.text)
            if plain is not None:
                words = iter(plain.group(1).upper().split())
                return {name: int(number) for name, number in zip(words, words)}
        values = self.values()
        if len(values) != 1 or not isinstance(values[0], tuple) or len(values[0]) % 2:
            raise ValueError("FETCH data is not a list of item/value pairs")
        pairs = values[0]
        out: FetchItems = {}
        for i in range(0, len(pairs), 2):
            name = pairs[i]
            if not isinstance(name, bytes):
                raise ValueError("FETCH item name is not an atom")
            out[bytes(name).upper()] = pairs[i + 1]
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


#: The parsed first line of the response being framed, in :class:`Response`'s field order:
#: ``kind``, ``tag``, ``number``, ``keyword``, ``code``, ``text``. A plain tuple (not a class
#: repeating those fields) because one is made for every response and passed on as it is.
_Head: TypeAlias = tuple[Kind, bytes | None, int | None, bytes | None, bytes | None, bytes]


def _parse_head(line: bytes) -> _Head:
    """Parse the first line of a response (without CRLF)."""
    if line[:1] == b"+":
        text = line[2:] if line[1:2] == b" " else line[1:]
        return ("continuation", None, None, None, None, text)
    first, sep, rest = line.partition(b" ")
    if not sep:
        raise ProtocolError("response line has no tag and keyword")
    number: int | None = None
    if first == b"*":
        kind: Kind = "untagged"
        tag = None
        word, _, rest = rest.partition(b" ")
        if is_number(word):
            number = int(word)
            word, _, rest = rest.partition(b" ")
    elif is_tag(first):
        kind, tag = "tagged", first
        word, _, rest = rest.partition(b" ")
    else:
        raise ProtocolError("response line starts with an invalid tag")
    if not is_atom(word):
        raise ProtocolError("response line has no valid keyword")
    keyword = word.upper()
    if kind == "tagged" and keyword not in (b"OK", b"NO", b"BAD"):
        raise ProtocolError("tagged response is not OK, NO or BAD")
    code: bytes | None = None
    if keyword in STATUS_WORDS and rest[:1] == b"[":
        end = rest.find(b"]")
        if end >= 0:  # an unclosed "[" is taken as plain text
            code, rest = rest[1:end], rest[end + 1 :].lstrip(b" ")
    return (kind, tag, number, keyword, code, rest)


@dataclass(slots=True)
class _Pending:
    """The response being framed: its lines and literals, and how much raw was emitted."""

    head: _Head
    may_have_literals: bool  # untagged data: a status response's text carries none
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
            if self._literal_left and self._literal_streaming and not self._buf:
                if not view:
                    break
                view = self._stream_direct(view, events)
                continue
            if view:  # everything else is taken from the buffer: a literal's octets or a line
                self._buf += view
                view = view[len(view) :]
            if not (self._take_literal(events) if self._literal_left else self._take_line(events)):
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
            kind, _, _, keyword, _, _ = head = _parse_head(line)
            literals = kind == "untagged" and keyword not in STATUS_WORDS
            pending = self._pending = _Pending(head, literals)
        pending.lines.append(line)
        pending.literals.append(None)
        pending.unemitted.append(raw)
        pending.size += len(raw)

        marker = literal_at_end(line, nonsync=False) if pending.may_have_literals else None
        if marker is None:
            events.append(self._complete(pending))
            return True
        size = marker.size
        if size <= self._threshold:
            pending.size += size
            if pending.size > self._max_response:
                raise ProtocolError(f"response larger than {self._max_response} octets")
            pending.literals[-1] = b""
            self._literal_left = size
            return True
        kind, tag, number, keyword, _, _ = pending.head
        pending.streamed.append(len(pending.lines) - 1)
        self._literal_streaming = True
        pending.literals[-1] = b""
        self._literal_left = size
        events.append(
            LiteralStart(kind, tag, number, keyword, line, size, b"".join(pending.unemitted))
        )
        pending.unemitted.clear()
        return True

    def _complete(self, pending: _Pending) -> Response:
        self._pending = None
        if pending.size > self._max_response:
            raise ProtocolError(f"response larger than {self._max_response} octets")
        return Response(
            *pending.head,
            lines=tuple(pending.lines),
            literals=tuple(pending.literals),
            raw=b"".join(pending.unemitted),
            streamed_literals=tuple(pending.streamed),
        )


# ---------------------------------------------------------------------- relay mode

_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY[ \]]", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Continuation:
    """A ``+`` continuation request; ``data`` is the whole line."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Tagged:
    """A tagged status response; ``status`` is upper case; ``data`` is the (rewritten) line."""

    tag: bytes
    status: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class Bye:
    """``* BYE``: the upstream is closing the connection; ``data`` is the whole line."""

    data: bytes


Item: TypeAlias = Union[memoryview, bytes, Continuation, Tagged, Bye]


def _word(line: bytes, start: int) -> bytes:
    end = line.find(b" ", start)
    return line[start : end if end >= 0 else len(line)].rstrip(b"\r\n").upper()


def _no_rewrite(line: bytes) -> bytes:
    return line


class ResponseScanner:
    """The reader's relay mode: finds response boundaries without holding literals (see the
    module docstring). ``rewrite_capability_line`` is applied to every line that announces
    capabilities; by default they pass unchanged."""

    def __init__(
        self, *, max_line: int = DEFAULT_MAX_LINE, rewrite_capability_line: Callable[[bytes], bytes] = _no_rewrite
    ):
        self.max_line = max_line
        self._rewrite = rewrite_capability_line
        self._partial = bytearray()  # start of a line whose end has not arrived
        self._partial_head_done = False  # ... already classified and partly passed on
        self._literal_left = 0
        self._response_start = True  # the next line starts a new response

    @property
    def at_boundary(self) -> bool:
        """True between two responses: nothing of a response is pending."""
        return self._response_start and not self._partial and not self._literal_left

    def feed(self, data: bytes) -> list[Item]:
        items: list[Item] = []
        view = memoryview(data)
        n = len(data)
        pos = run = 0  # data[run:pos] is ordinary pass-through not yet emitted
        find = data.find
        while pos < n:
            if self._literal_left:
                take = min(self._literal_left, n - pos)
                self._literal_left -= take
                pos += take
                continue
            nl = find(b"\n", pos)
            if nl < 0:
                if run < pos:
                    items.append(view[run:pos])
                self._partial += view[pos:]
                run = pos = n
                self._pass_long_partial(items)
                break
            end = nl + 1
            if self._partial:
                if run < pos:
                    items.append(view[run:pos])
                self._partial += view[pos:end]
                line = bytes(self._partial)
                self._partial.clear()
                head_done, self._partial_head_done = self._partial_head_done, False
                run = pos = end
                if head_done:
                    items.append(self._data_line(line))
                else:
                    special = self._line(line)
                    items.append(line if special is None else special)
                continue
            numbered = data[pos] == 0x2A and data[pos + 2 : pos + 3].isdigit()
            if not self._response_start or numbered:
                # Fast path: data inside a response, or "* <number> ..." (FETCH, EXISTS, ...).
                if data[nl - 1] == 0x7D or (data[nl - 1] == 0x0D and data[nl - 2] == 0x7D):
                    self._after_data_line(data[max(pos, nl - _LITERAL_TAIL) : end])
                else:
                    self._response_start = True
                pos = end
                continue
            item = self._line(data[pos:end])
            if item is None:  # ordinary: stays in the run
                pos = end
                continue
            if run < pos:
                items.append(view[run:pos])
            items.append(item)
            run = pos = end
        if run < n:
            items.append(view[run:n])
        return items

    def _after_data_line(self, tail: bytes) -> None:
        """Account for the end of a data line (``tail``: its last bytes): does it announce a
        literal?"""
        text = tail[:-2] if tail.endswith(b"\r\n") else tail[:-1]
        marker = literal_at_end(text, nonsync=False)
        if marker is None:
            self._response_start = True
        else:
            self._literal_left = marker.size
            self._response_start = False

    def _data_line(self, line: bytes) -> bytes:
        self._after_data_line(line[-_LITERAL_TAIL:])
        return line

    def _line(self, line: bytes) -> Item | None:
        """A whole line: what to relay in its place, or ``None`` to relay it unchanged."""
        if not self._response_start:
            self._data_line(line)
            return None
        first = line[:1]
        if first == b"+":
            return Continuation(line)
        if first == b"*":
            word = _word(line, 2)
            if word == b"BYE":
                return Bye(line)
            if word in STATUS_WORDS:
                return self._rewrite(line) if _CAPABILITY_CODE.search(line) else None
            if word == b"CAPABILITY":
                return self._rewrite(line)
            self._data_line(line)
            return None
        sp = line.find(b" ")
        tag = line[:sp] if sp > 0 else line.rstrip(b"\r\n")
        status = _word(line, sp + 1) if sp > 0 else b""
        if _CAPABILITY_CODE.search(line):
            line = self._rewrite(line)
        return Tagged(tag=tag, status=status, data=line)

    def _pass_long_partial(self, items: list[Item]) -> None:
        """Pass on most of an overlong partial line of untagged data, keeping its tail."""
        if len(self._partial) <= self.max_line:
            return
        if not self._partial_head_done and self._response_start:
            head = bytes(self._partial[:64])
            if not head.startswith(b"* ") or _word(head, 2) in STATUS_WORDS | {b"CAPABILITY"}:
                raise ProtocolError("upstream response line is too long")
        self._partial_head_done = True
        cut = len(self._partial) - _LITERAL_TAIL
        items.append(bytes(self._partial[:cut]))
        del self._partial[:cut]


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
    return _capability_set(bytes(atoms))


@functools.lru_cache(maxsize=64)
def _capability_set(atoms: bytes) -> frozenset[str]:
    """One shared set per distinct capability list: every session of a provider keeps the
    same ~40 strings (about 4 KiB per session, docs/performance.md)."""
    return frozenset(a.decode("ascii", "replace").upper() for a in atoms.split())
