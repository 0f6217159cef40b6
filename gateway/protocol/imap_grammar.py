"""The IMAP tokens both directions share (RFC 3501 §9 / RFC 9051 §9 formal syntax), sans-IO.

Theory of operation
-------------------
Every rule here is written once, from the RFC's ABNF, and used by the client → server framers
(:mod:`gateway.protocol.imap_commands`), the server → client reader
(:mod:`gateway.protocol.imap_responses`) and the relay's policy
(:mod:`gateway.protocol.imap_passthrough`):

``tag``
    ``1*<any ASTRING-CHAR except "+">``; ``ASTRING-CHAR = ATOM-CHAR / resp-specials`` and
    ``resp-specials = "]"``, so ``]`` *is* allowed in a tag. ``ATOM-CHAR`` is any ``CHAR``
    (7-bit, no NUL) except ``atom-specials``: ``( ) {`` SP, CTL, ``% *`` (list wildcards),
    ``" \\`` (quoted specials) and ``]``. :func:`is_tag`.
``atom``
    ``1*ATOM-CHAR``: :func:`is_atom` (strict, for response keywords). Command and response
    *data* are read leniently (:data:`LENIENT_ATOM`: anything up to a delimiter, so ``\\Seen``,
    ``\\*``, ``%`` and 8-bit bytes are accepted as they come).
literal marker
    At the end of a line: ``{n}`` (synchronizing), ``{n+}`` (non-synchronizing, RFC 7888, client
    → server only), ``~{n}`` / ``~{n+}`` (literal8, RFC 3516). :func:`literal_at_end` returns a
    :class:`LiteralMarker` (or ``None``); sizes beyond ``max_size`` raise :class:`ProtocolError`.
quoted string
    ``DQUOTE *QUOTED-CHAR DQUOTE`` with ``\\"`` and ``\\\\`` escapes: :func:`quote` writes one,
    :class:`ValueParser` reads one.
values
    :class:`ValueParser` reads a sequence of IMAP data items spread over line *segments* with a
    literal between each two (the shape of a framed command or response): atoms (:class:`Atom`),
    strings (``bytes``: quoted or literal) and parenthesised lists (``tuple``). In *response*
    mode numbers become ``int``, ``NIL`` becomes ``None`` and an atom's ``[...]`` part is read
    whole (``BODY[HEADER.FIELDS (FROM)]<0>`` is one token, as RFC 3501's ``msg-att`` wants).
mailbox names
    Modified UTF-7 (RFC 3501 §5.1.3): :func:`encode_mailbox` / :func:`decode_mailbox`.

:class:`ProtocolError` is the one error for a byte stream that is not well-formed IMAP or breaks
a limit, in either direction (a ``ValueError``).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Final, TypeAlias, Union

__all__ = [
    "LENIENT_ATOM",
    "MAX_LITERAL_SIZE",
    "STATUS_WORDS",
    "Atom",
    "LiteralMarker",
    "ProtocolError",
    "Value",
    "ValueParser",
    "decode_mailbox",
    "encode_mailbox",
    "is_atom",
    "is_number",
    "is_tag",
    "literal_at_end",
    "quote",
]

#: Largest literal size taken from the wire at all (a sanity cap; the framers have their own).
MAX_LITERAL_SIZE: Final = 1 << 40
#: The status response keywords (``resp-cond-state``, ``resp-cond-bye``, ``resp-cond-auth``).
STATUS_WORDS: Final = frozenset({b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"})

# ATOM-CHAR: CHAR (%x01-7F) minus atom-specials ( ) { SP CTL % * " \ ]
_TAG = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\+]+\Z")  # ASTRING-CHAR minus "+"
_ATOM = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\\]]+\Z")
_NUMBER = re.compile(rb"[0-9]{1,10}\Z")
#: Lenient atom characters for reading data: anything up to SP, CTL, ( ) { or DQUOTE.
LENIENT_ATOM: Final = re.compile(rb"[^\x00-\x20\x7f(){\"]+")
# The same in responses, where a "[...]" part (a section, a response code) is read whole.
_SECTIONED_ATOM = re.compile(rb"[^\x00-\x20\x7f(){\"\[]*(?:\[[^\]]*\][^\x00-\x20\x7f(){\"\[]*)*")
_LITERAL_AT_END = re.compile(rb"(~?)\{([0-9]{1,20})(\+?)\}\Z")
_QUOTED_BODY = re.compile(rb'(?:[^"\\]|\\["\\])*')
_QUOTED_ESCAPE = re.compile(rb'\\(["\\])')


class ProtocolError(ValueError):
    """A byte stream that is not well-formed IMAP (either direction), or breaks a limit."""


def is_tag(word: bytes) -> bool:
    """``tag = 1*<any ASTRING-CHAR except "+">`` (``]`` included)."""
    return _TAG.match(word) is not None


def is_atom(word: bytes) -> bool:
    """``atom = 1*ATOM-CHAR`` (strict: 7-bit, no atom-specials)."""
    return _ATOM.match(word) is not None


def is_number(word: bytes) -> bool:
    """``number``: 1 to 10 digits (a 32-bit value at most in size)."""
    return _NUMBER.match(word) is not None


@dataclass(frozen=True, slots=True)
class LiteralMarker:
    """A literal announced at the end of a line: where its marker starts, size and kind."""

    start: int  # index of "{" (or "~") in the line
    size: int
    sync: bool  # False for {n+}
    binary: bool  # True for ~{n}


def literal_at_end(
    text: bytes, *, max_size: int = MAX_LITERAL_SIZE, nonsync: bool = True
) -> LiteralMarker | None:
    """The literal announced at the very end of ``text`` (a line without its CRLF), if any.

    ``nonsync=False`` (server responses) takes ``{n+}`` for text, not a literal.
    """
    if not text.endswith(b"}"):
        return None
    m = _LITERAL_AT_END.search(text)
    if m is None or (m.group(3) and not nonsync):
        return None
    size = int(m.group(2))
    if size > max_size:
        raise ProtocolError("literal size is out of range")
    return LiteralMarker(start=m.start(), size=size, sync=not m.group(3), binary=bool(m.group(1)))


def quote(raw: bytes) -> bytes:
    """``raw`` as a quoted string. CR, LF and NUL cannot be quoted: ``ValueError``."""
    if b"\r" in raw or b"\n" in raw or b"\x00" in raw:
        raise ValueError("a quoted string cannot hold CR, LF or NUL")
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


# --------------------------------------------------------------------------- values


class Atom(bytes):
    """An unquoted item (``INBOX``, ``\\Seen``, ``BODY[]``). Strings are plain ``bytes``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({bytes(self)!r})"


#: A data item: Atom | bytes (string) | tuple (list); in response mode also int and None (NIL).
Value: TypeAlias = Union[bytes, int, None, tuple["Value", ...]]


class ValueParser:
    """Reads data items spread over line segments with literals between them.

    ``segments[i]`` is followed by ``literals[i]`` (``len(literals) == len(segments) - 1``, or
    fewer while a command is incomplete); parsing starts at ``pos`` of the first segment.
    ``response=True`` turns numbers into ``int`` and ``NIL`` into ``None`` and reads an atom's
    ``[...]`` part whole. Malformed input raises ``ValueError`` with a short reason.
    """

    def __init__(self, segments: list[bytes], literals: list[bytes], pos: int = 0, *, response: bool = False):
        self._segments = segments
        self._literals = literals
        self._i = 0
        self._pos = pos
        self._response = response

    def parse(self) -> tuple[Value, ...]:
        return tuple(self._items(closing=False))

    def _items(self, *, closing: bool) -> list[Value]:
        items: list[Value] = []
        need_separator = False
        while True:
            seg = self._segments[self._i]
            if self._pos < len(seg) and seg[self._pos] == 0x20:
                while self._pos < len(seg) and seg[self._pos] == 0x20:
                    self._pos += 1
                need_separator = False
                continue
            if self._pos == len(seg):
                if self._i < len(self._literals):  # a literal stands here
                    items.append(self._literals[self._i])
                    self._i += 1
                    self._pos = 0
                    need_separator = True
                    continue
                if closing:
                    raise ValueError("unterminated list")
                return items
            c = seg[self._pos]
            if c == 0x29:  # ")"
                if not closing:
                    raise ValueError("unexpected ')'")
                self._pos += 1
                return items
            if need_separator and not (
                # RFC 3501 body-type-mpart = 1*body SP media-subtype: a multipart
                # BODYSTRUCTURE writes its parts' lists back to back, with no space.
                self._response and c == 0x28 and items and isinstance(items[-1], tuple)
            ):
                raise ValueError("missing space between arguments")
            if c == 0x28:  # "("
                self._pos += 1
                items.append(tuple(self._items(closing=True)))
            elif c == 0x22:  # '"'
                items.append(self._quoted(seg))
            else:
                items.append(self._atom(seg))
            need_separator = True

    def _atom(self, seg: bytes) -> Value:
        m = (_SECTIONED_ATOM if self._response else LENIENT_ATOM).match(seg, self._pos)
        if m is None or m.end() == self._pos:
            raise ValueError("invalid character in command")
        self._pos = m.end()
        word = m.group()
        if self._response:
            if word.isdigit():
                return int(word)
            if word.upper() == b"NIL":
                return None
        return Atom(word)

    def _quoted(self, seg: bytes) -> bytes:
        m = _QUOTED_BODY.match(seg, self._pos + 1)
        assert m is not None  # the pattern matches the empty string
        end = m.end()
        if end >= len(seg) or seg[end] != 0x22:
            raise ValueError("unterminated or badly escaped quoted string")
        self._pos = end + 1
        body = m.group()
        if 0 in body:
            raise ValueError("NUL in quoted string")
        return _QUOTED_ESCAPE.sub(rb"\1", body) if b"\\" in body else body


# --------------------------------------------------------------------------- mailbox names


def encode_mailbox(name: str) -> bytes:
    """A mailbox name in modified UTF-7 (RFC 3501 §5.1.3): ``&`` → ``&-``, non-ASCII runs as
    ``&`` + modified base64 of UTF-16BE (``,`` for ``/``, no padding) + ``-``."""
    out = bytearray()
    run: list[str] = []

    def flush() -> None:
        if run:
            b64 = base64.b64encode("".join(run).encode("utf-16-be")).rstrip(b"=").replace(b"/", b",")
            out.extend(b"&" + b64 + b"-")
            run.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.extend(b"&-" if ch == "&" else ch.encode("ascii"))
        else:
            run.append(ch)
    flush()
    return bytes(out)


def decode_mailbox(raw: bytes) -> str:
    """The inverse of :func:`encode_mailbox`; a malformed shift sequence is kept as it is."""
    out: list[str] = []
    pos = 0
    while pos < len(raw):
        amp = raw.find(b"&", pos)
        if amp < 0:
            out.append(raw[pos:].decode("latin-1"))
            break
        out.append(raw[pos:amp].decode("latin-1"))
        end = raw.find(b"-", amp)
        if end < 0:
            out.append(raw[amp:].decode("latin-1"))
            break
        if end == amp + 1:
            out.append("&")
        else:
            b64 = raw[amp + 1 : end].replace(b",", b"/")
            try:
                out.append(base64.b64decode(b64 + b"=" * (-len(b64) % 4), validate=True).decode("utf-16-be"))
            except (binascii.Error, ValueError):
                out.append(raw[amp : end + 1].decode("latin-1"))
        pos = end + 1
    return "".join(out)
