"""Sans-IO scanner of the upstream → client IMAP byte stream for the post-login relay.

Theory of operation
-------------------
After login, mailgate relays the upstream server's bytes to the client almost untouched. It only
needs to know three things about them:

* where each *response* starts, to see continuation requests (``+``), tagged completions
  (``tag OK/NO/BAD``: the client framer must learn that a literal or IDLE was refused) and
  ``* BYE``;
* which lines announce capabilities (``* CAPABILITY …``, ``[CAPABILITY …]`` codes in status
  responses), to rewrite them: a client must never see ``AUTH=*``, ``SASL-IR``, ``STARTTLS``,
  ``LOGINDISABLED`` after login, nor ``COMPRESS=DEFLATE`` (mailgate does not relay compressed
  streams), and it sees ``LITERAL+`` in place of ``LITERAL-`` because mailgate converts large
  non-synchronizing literals itself (see :mod:`gateway.protocol.imap_commands`);
* where literals are, so that their octets (message bodies) are skipped without being looked at.

:class:`ResponseScanner` is fed each chunk as received and returns a list of *items*, in order:
``memoryview``/``bytes`` to pass through unchanged (slices of the chunk: ordinary lines and literal
octets cost no copy and no per-byte Python work), and the events :class:`Continuation`,
:class:`Tagged` and :class:`Bye`, each carrying the bytes of its line to relay (or not). Lines of
untagged data (``* 5 FETCH …``) take a fast path: one ``find`` for the line end and a look at its
last bytes for a literal. A partial line is held until its end arrives; a line longer than
``max_line`` is passed on in pieces (only status and capability lines must be whole; those are
short, so an overlong one is a :class:`ProtocolError`). A literal is never held: it streams.

Status responses and continuation requests carry text, never literals, so a trailing ``{5}``
there is text (as in :mod:`gateway.protocol.imap_responses`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, TypeAlias, Union

from .imap_responses import rewrite_capabilities

__all__ = [
    "DEFAULT_MAX_LINE",
    "Bye",
    "Continuation",
    "Item",
    "ProtocolError",
    "ResponseScanner",
    "Tagged",
    "client_capabilities",
    "rewrite_capability_line",
]

#: Longest response line held whole; longer untagged data lines are passed on in pieces.
DEFAULT_MAX_LINE: Final = 64 * 1024
#: Bytes kept back from a line passed on in pieces: enough to recognise ``~{<20 digits>}\r\n``.
_LITERAL_TAIL: Final = 32

#: Capabilities a client must not see after login (an entry ending in "=" is a prefix).
POST_LOGIN_DROP: Final = (
    b"AUTH=", b"SASL-IR", b"STARTTLS", b"LOGINDISABLED", b"COMPRESS=", b"LITERAL-"
)
#: Distinct upstream capability lists whose client form is remembered (a few per provider).
CAPABILITY_CACHE_SIZE: Final = 32
#: Capabilities mailgate adds after login: it converts literals for LITERAL- upstreams itself.
POST_LOGIN_ADD: Final = (b"LITERAL+",)

_STATUS_WORDS = frozenset({b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"})
_LITERAL_END = re.compile(rb"\{([0-9]{1,20})\}\r?\n\Z")
_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY[ \]]", re.IGNORECASE)


class ProtocolError(ValueError):
    """The upstream's byte stream cannot be relayed (an overlong status or capability line)."""


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


def client_capabilities(upstream: Iterable[str]) -> list[str]:
    """The upstream's post-login capabilities as mailgate's clients see them."""
    return list(_client_capabilities(tuple(upstream)))


@functools.lru_cache(maxsize=CAPABILITY_CACHE_SIZE)
def _client_capabilities(upstream: tuple[str, ...]) -> tuple[str, ...]:
    # Every login of a provider's accounts sees the same ~50 atoms: computed once, not per login.
    drop = [d.decode() for d in POST_LOGIN_DROP]
    out: list[str] = []
    for cap in upstream:
        up = cap.upper()
        if not any(up.startswith(d) if d.endswith("=") else up == d for d in drop):
            out.append(cap)
    present = {c.upper() for c in out}
    out += [a.decode() for a in POST_LOGIN_ADD if a.decode() not in present]
    return tuple(out)


def rewrite_capability_line(line: bytes) -> bytes:
    """One response line with its capability list (if any) made fit for a logged-in client."""
    return rewrite_capabilities(line, drop=POST_LOGIN_DROP, add=POST_LOGIN_ADD)


def _word(line: bytes, start: int) -> bytes:
    end = line.find(b" ", start)
    return line[start : end if end >= 0 else len(line)].rstrip(b"\r\n").upper()


class ResponseScanner:
    """Finds response boundaries in the upstream's stream (see the module docstring)."""

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE):
        self.max_line = max_line
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
        """Account for the end of a data line: does it announce a literal?"""
        m = _LITERAL_END.search(tail)
        if m is None:
            self._response_start = True
        else:
            self._literal_left = int(m.group(1))
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
            if word in _STATUS_WORDS:
                return rewrite_capability_line(line) if _CAPABILITY_CODE.search(line) else None
            if word == b"CAPABILITY":
                return rewrite_capability_line(line)
            self._data_line(line)
            return None
        sp = line.find(b" ")
        tag = line[:sp] if sp > 0 else line.rstrip(b"\r\n")
        status = _word(line, sp + 1) if sp > 0 else b""
        if _CAPABILITY_CODE.search(line):
            line = rewrite_capability_line(line)
        return Tagged(tag=tag, status=status, data=line)

    def _pass_long_partial(self, items: list[Item]) -> None:
        """Pass on most of an overlong partial line of untagged data, keeping its tail."""
        if len(self._partial) <= self.max_line:
            return
        if not self._partial_head_done and self._response_start:
            head = bytes(self._partial[:64])
            if not head.startswith(b"* ") or _word(head, 2) in _STATUS_WORDS | {b"CAPABILITY"}:
                raise ProtocolError("upstream response line is too long")
        self._partial_head_done = True
        cut = len(self._partial) - _LITERAL_TAIL
        items.append(bytes(self._partial[:cut]))
        del self._partial[:cut]
