"""Sans-IO framing of the IMAP client → server byte stream, and mailgate's own IMAP answers.

Theory of operation
-------------------
An IMAP command is a *line* that may end with a literal announcement: ``{n}`` (synchronizing,
the client waits for a ``+`` continuation before sending the *n* octets) or ``{n+}``
(non-synchronizing, RFC 7888: the octets follow at once). After the literal the command goes on
with another line, which may announce another literal, and so on::

    command = line *(literal line)        line ends with LF (normally CRLF)

Two framers read this stream. Both are fed with ``receive_data(bytes)`` and hand out events from
``next_event()`` until it returns :data:`NEED_DATA`; neither does any I/O (the h11 model). Input
that breaks a limit or cannot be framed at all raises :class:`ProtocolError`, the only exception
they raise on bad input; the driver answers ``* BYE`` and closes.

:class:`CommandReader` — before login, where mailgate answers everything itself
    Holds each whole command (bounded by the small pre-login limits) and parses it into a
    :class:`Command`: tag, upper-cased name and arguments (atoms, quoted strings with ``\\\\`` and
    ``\\"`` escapes, literals, parenthesised lists). A synchronizing literal first gives
    :class:`LiteralContinue` (the driver sends ``+``). A command that is well framed but
    malformed gives :class:`BadCommand` and the reader goes on with the next command.
    ``expect_continuation_line()`` makes the next line a raw :class:`ContinuationLine` (a SASL
    answer for AUTHENTICATE). ``discard_buffer()`` drops whatever was received after STARTTLS
    (those plaintext bytes must never be executed once TLS is up).

:class:`CommandRelay` — after login, where commands go to the upstream server
    Never holds a literal: it reads one line at a time (bounded by ``max_line``) and passes
    literal octets through as :class:`Forward` chunks as they arrive, so relaying a 20 MB APPEND
    costs one chunk of memory. It frames; the session's state (the command in progress, IDLE,
    the commands in flight, which commands mailgate answers itself) is a
    :class:`~gateway.protocol.imap_relay_state.RelayState`, to which it reports every line and
    literal end and whose phase tells it what the next bytes are. The first line of every
    relayed command comes as :class:`CommandLine` (tag and name pre-parsed); a command mailgate
    answers itself comes as :class:`Reply` when its answer is due (the rest of it, literal
    octets included, is dropped). It keeps the literal policy of the upstream: a client's
    ``{n+}`` larger than the upstream accepts (LITERAL-: 4096 octets) is rewritten to ``{n}``
    and followed by :class:`AwaitContinuation`: the driver must get the upstream's ``+`` (which
    the client never asked for, so it is not relayed) before forwarding the literal.

    What the upstream says (``+``, tagged responses, ``* BYE``) the driver reports to the state,
    not to the framer.

Response builders at the end of the module produce mailgate's own pre-login answers (greeting,
CAPABILITY, tagged status, BYE, continuation, ID).

The tokens (tag, atom, literal marker, quoted string, argument values) and
:class:`ProtocolError` are :mod:`gateway.protocol.imap_grammar`'s, shared with the response
reader.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias, Union

from .imap_grammar import (
    LENIENT_ATOM,
    Atom,
    LiteralMarker,
    ProtocolError,
    Value,
    ValueParser,
    is_tag,
    literal_at_end,
)
from .imap_grammar import quote as quote_string
from .imap_relay_state import LITERAL_PHASES, Event, Phase, RelayState

__all__ = [
    "LITERAL_MINUS_MAX",
    "NEED_DATA",
    "Arg",
    "AwaitContinuation",
    "Atom",
    "BadCommand",
    "Command",
    "CommandLine",
    "CommandReader",
    "CommandRelay",
    "ContinuationLine",
    "Forward",
    "LiteralContinue",
    "ProtocolError",
    "Reply",
    "astring",
    "bye",
    "capability_response",
    "continuation",
    "greeting",
    "id_response",
    "is_nil",
    "parse_arguments",
    "prelogin_capabilities",
    "quote",
    "rewrite_nonsync_literal",
    "tagged",
    "untagged",
]

#: Largest non-synchronizing literal a LITERAL- server accepts (RFC 7888 §4).
LITERAL_MINUS_MAX: Final = 4096
#: Largest literal size written in a command at all (RFC 3501 ``number`` is 32-bit).
MAX_LITERAL_NUMBER: Final = 0xFFFFFFFF

_LF = 0x0A


# --------------------------------------------------------------------------- events


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event()`` when more bytes are needed.
NEED_DATA: Final = _NeedData()


#: A command argument: Atom | bytes (string) | tuple (list); commands never give int or None.
Arg: TypeAlias = Value


@dataclass(frozen=True, slots=True)
class Command:
    """A whole command read before login. ``name`` is upper case; strings are ``bytes``."""

    tag: bytes
    name: bytes
    args: tuple[Arg, ...]

    def __repr__(self) -> str:  # arguments may be passwords: never show them
        return f"Command(tag={self.tag!r}, name={self.name!r}, args=<{len(self.args)}>)"


@dataclass(frozen=True, slots=True)
class BadCommand:
    """A well-framed but malformed command; answer ``tag BAD reason`` (``*`` if no tag)."""

    tag: bytes | None
    reason: str


@dataclass(frozen=True, slots=True)
class LiteralContinue:
    """The client announced a synchronizing literal and waits for a ``+`` continuation."""

    tag: bytes


@dataclass(frozen=True, slots=True)
class ContinuationLine:
    """A raw line asked for with ``expect_continuation_line()`` (without its CRLF)."""

    data: bytes

    def __repr__(self) -> str:  # a SASL answer carries a password
        return f"ContinuationLine(<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class CommandLine:
    """The first line of a command being relayed.

    ``data`` is what to forward (the line as received, or with its literal rewritten);
    ``arguments`` is the rest of the line after the command name, without the literal marker.
    ``name`` is upper case, ``b"UID FETCH"`` style for UID commands, ``b""`` if unparsable.
    ``literal`` is the size of the literal announced at the end of the line, if any.
    """

    tag: bytes
    name: bytes
    arguments: bytes
    data: bytes
    literal: int | None

    def __repr__(self) -> str:  # LOGIN arguments are secrets; APPEND lines are harmless but long
        return f"CommandLine(tag={self.tag!r}, name={self.name!r}, literal={self.literal})"


@dataclass(frozen=True, slots=True)
class Forward:
    """Bytes of the current command (a following line or literal octets) to pass upstream."""

    data: bytes

    def __repr__(self) -> str:
        return f"Forward(<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class AwaitContinuation:
    """Forwarded a rewritten ``{n}``: wait for the upstream's ``+`` before going on."""

    tag: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """mailgate's own answer to a command it does not relay: write it to the client now
    (between two responses)."""

    data: bytes


ReaderEvent: TypeAlias = Union[Command, BadCommand, LiteralContinue, ContinuationLine, _NeedData]
RelayEvent: TypeAlias = Union[CommandLine, Forward, AwaitContinuation, Reply, _NeedData]


# --------------------------------------------------------------------------- helpers


def _split_line(line: bytes) -> bytes:
    """``line`` without its LF and an optional CR before it."""
    end = len(line) - 1
    if end > 0 and line[end - 1] == 0x0D:
        end -= 1
    return line[:end]


def _literal_at_end(text: bytes) -> LiteralMarker | None:
    """The literal announced at the end of ``text`` (a line without CRLF), if any."""
    return literal_at_end(text, max_size=MAX_LITERAL_NUMBER)


def rewrite_nonsync_literal(
    line: bytes, limit: int | None = LITERAL_MINUS_MAX
) -> tuple[bytes, bool]:
    """Turn a trailing ``{n+}`` into ``{n}`` when *n* exceeds ``limit``.

    ``line`` is one command line with its line ending. ``limit`` is the largest non-synchronizing
    literal the server accepts (4096 for LITERAL-, 0 for a server with neither LITERAL+ nor
    LITERAL-, ``None`` for LITERAL+: never rewrite). Returns the line and whether it changed.
    """
    text = _split_line(line)
    lit = _literal_at_end(text)
    if lit is None or lit.sync or limit is None or lit.size <= limit:
        return line, False
    ending = line[len(text) :]
    marker = (b"~" if lit.binary else b"") + b"{%d}" % lit.size
    return text[: lit.start] + marker + ending, True


def astring(arg: Arg) -> bytes | None:
    """An astring argument (atom, quoted or literal) as bytes; ``None`` for a list."""
    return bytes(arg) if isinstance(arg, bytes) else None


def is_nil(arg: Arg) -> bool:
    return isinstance(arg, Atom) and arg.upper() == b"NIL"


def parse_arguments(text: bytes) -> tuple[Arg, ...] | None:
    """Parse one line of arguments (no literals); ``None`` if it is malformed."""
    try:
        return ValueParser([text], []).parse()
    except ValueError:
        return None


def _head(text: bytes) -> tuple[bytes, bytes, int]:
    """Split ``tag SP name [SP ...]``: the tag, the name (as sent) and where arguments start."""
    sp1 = text.find(b" ")
    if sp1 <= 0:
        return text, b"", len(text)
    sp2 = text.find(b" ", sp1 + 1)
    if sp2 < 0:
        sp2 = len(text)
    return text[:sp1], text[sp1 + 1 : sp2], sp2


class _LineBuffer:
    """A byte buffer that hands out LF-terminated lines, refusing lines over ``max_line``."""

    def __init__(self, max_line: int):
        self.max_line = max_line
        self.data = bytearray()
        self._scanned = 0  # bytes known to hold no LF

    def take_line(self) -> bytes | None:
        idx = self.data.find(b"\n", self._scanned)
        if idx < 0:
            self._scanned = len(self.data)
            if len(self.data) >= self.max_line:
                raise ProtocolError("command line is too long")
            return None
        if idx + 1 > self.max_line:
            raise ProtocolError("command line is too long")
        line = bytes(self.data[: idx + 1])
        del self.data[: idx + 1]
        self._scanned = 0
        return line

    def take(self, n: int) -> bytes:
        chunk = bytes(self.data[:n])
        del self.data[:n]
        self._scanned = 0
        return chunk

    def clear(self) -> None:
        self.data.clear()
        self._scanned = 0


# --------------------------------------------------------------------------- pre-login reader


class CommandReader:
    """Frames and parses whole commands before login (see the module docstring)."""

    def __init__(self, *, max_line: int, max_literal: int, max_command: int | None = None):
        self._buf = _LineBuffer(max_line)
        self.max_literal = max_literal
        #: Most octets one command may hold, lines and literals together.
        self.max_command = max_command if max_command is not None else max_line + max_literal
        self._reset_command()
        self._continuation_line = False

    def _reset_command(self) -> None:
        self._segments: list[bytes] = []
        self._literals: list[bytes] = []
        self._held = 0
        self._literal_left: int | None = None  # octets of the current literal still to come
        self._literal_chunks: list[bytes] = []
        self._discarding: BadCommand | None = None  # skip the rest of a non-sync-literal command

    @property
    def buffered(self) -> int:
        return len(self._buf.data)

    def receive_data(self, data: bytes) -> None:
        self._buf.data += data

    def discard_buffer(self) -> None:
        """Forget every byte received but not yet consumed (call before starting TLS)."""
        self._buf.clear()
        self._reset_command()

    def take_buffered(self) -> bytes:
        """Hand over the bytes received but not yet consumed (pipelined after LOGIN)."""
        data = bytes(self._buf.data)
        self._buf.clear()
        self._reset_command()
        return data

    def expect_continuation_line(self) -> None:
        """The next event is the client's raw answer line to a ``+`` continuation."""
        self._continuation_line = True

    def next_event(self) -> ReaderEvent:
        while True:
            if self._literal_left is not None:
                if not self._read_literal():
                    return NEED_DATA
                continue
            line = self._buf.take_line()
            if line is None:
                return NEED_DATA
            text = _split_line(line)
            if self._continuation_line:
                self._continuation_line = False
                return ContinuationLine(text)
            event = self._on_line(text)
            if event is not None:
                return event

    def _read_literal(self) -> bool:
        assert self._literal_left is not None
        take = min(self._literal_left, len(self._buf.data))
        if take:
            chunk = self._buf.take(take)
            if self._discarding is None:
                self._literal_chunks.append(chunk)
            self._literal_left -= take
        if self._literal_left:
            return False
        if self._discarding is None:
            self._literals.append(b"".join(self._literal_chunks))
        self._literal_chunks = []
        self._literal_left = None
        return True

    def _on_line(self, text: bytes) -> ReaderEvent | None:
        first = not self._segments and self._discarding is None
        tag = _head(text)[0] if first else self._first_tag()
        valid_tag = is_tag(tag)
        lit = _literal_at_end(text)
        self._held += len(text) + 2
        if lit is None:
            return self._finish(text, tag if valid_tag else None)
        if self._discarding is not None:  # still skipping a refused command
            if lit.sync:  # the client waits for "+", which never comes: the command is over
                bad = self._discarding
                self._reset_command()
                return bad
            self._literal_left = lit.size
            return None
        problem = None
        if not valid_tag:
            problem = "missing or invalid tag"
        elif lit.binary:
            problem = "literal8 is not allowed here"
        elif lit.size > self.max_literal or self._held + lit.size > self.max_command:
            problem = "literal is too large"
        if problem is not None:
            bad = BadCommand(tag if valid_tag else None, problem)
            if lit.sync:  # the client will not send the literal: we simply do not ask for it
                self._reset_command()
                return bad
            if lit.size > self.max_literal:
                raise ProtocolError("non-synchronizing literal is too large")
            self._discarding = bad
            self._literal_left = lit.size
            return None
        self._segments.append(text[: lit.start])
        self._held += lit.size
        self._literal_left = lit.size
        return LiteralContinue(tag) if lit.sync else None

    def _first_tag(self) -> bytes:
        return _head(self._segments[0])[0] if self._segments else b""

    def _finish(self, text: bytes, tag: bytes | None) -> Command | BadCommand:
        if self._discarding is not None:
            bad = self._discarding
            self._reset_command()
            return bad
        segments = [*self._segments, text]
        literals, held = self._literals, self._held
        self._reset_command()
        if held > self.max_command:
            return BadCommand(tag, "command is too long")
        if tag is None:
            return BadCommand(None, "missing or invalid tag")
        first = segments[0]
        _, name, args_at = _head(first)
        if not name or LENIENT_ATOM.fullmatch(name) is None:
            return BadCommand(tag, "missing or invalid command name")
        try:
            args = ValueParser(segments, literals, args_at).parse()
        except ValueError as exc:
            return BadCommand(tag, str(exc))
        return Command(tag=tag, name=name.upper(), args=args)


# --------------------------------------------------------------------------- post-login relay


class CommandRelay:
    """Frames the client's commands after login for relaying (see the module docstring).

    The framing is here, the state is :attr:`state`'s: each line and literal end is reported to
    it as an :class:`~gateway.protocol.imap_relay_state.Event`, and its phase says what the next
    bytes are (a line, literal octets to forward or to drop, octets to hold).
    """

    def __init__(
        self,
        *,
        max_line: int,
        max_literal: int,
        nonsync_literal_limit: int | None,
        state: RelayState | None = None,
    ):
        self._buf = _LineBuffer(max_line)
        self.max_literal = max_literal
        #: Largest ``{n+}`` passed unchanged; ``None`` when the upstream has LITERAL+.
        self.nonsync_literal_limit = nonsync_literal_limit
        self.state = state if state is not None else RelayState()
        self._literal_left = 0
        self._announce = False  # hand out AwaitContinuation for the literal just rewritten

    def receive_data(self, data: bytes) -> None:
        self._buf.data += data

    def next_event(self) -> RelayEvent:
        state = self.state
        while True:
            phase = state.phase
            if phase in LITERAL_PHASES:
                if phase is Phase.OUR_LITERAL:  # nothing moves before the upstream's "+"
                    if self._announce:
                        self._announce = False
                        return AwaitContinuation(state.tag)
                    return NEED_DATA
                if self._literal_left:
                    if not self._buf.data:
                        return NEED_DATA
                    take = min(self._literal_left, len(self._buf.data))
                    chunk = self._buf.take(take)
                    self._literal_left -= take
                elif phase is Phase.SYNC_LITERAL and not self._buf.data:
                    return NEED_DATA  # {0}: the client sends the rest of the line after "+"
                else:
                    chunk = b""
                if not self._literal_left:
                    state.client_event(Event.LITERAL_END)
                if chunk and phase is not Phase.SKIP_LITERAL:
                    return Forward(chunk)
                continue
            line = self._buf.take_line()
            if line is None:
                return NEED_DATA
            event = self._on_line(line, phase)
            if event is not None:
                return event

    def _on_line(self, line: bytes, phase: Phase) -> RelayEvent | None:
        text = _split_line(line)
        if phase is Phase.IDLE:
            self.state.client_event(Event.DONE if text.upper() == b"DONE" else Event.LINE)
            return Forward(line)
        lit = _literal_at_end(text)
        if lit is None:
            kind = Event.LINE
        else:
            if lit.size > self.max_literal:
                raise ProtocolError("literal is too large")
            self._literal_left = lit.size
            limit = self.nonsync_literal_limit
            if lit.sync:
                kind = Event.SYNC_LITERAL
            elif limit is not None and lit.size > limit:
                kind = Event.BIG_NONSYNC_LITERAL
            else:
                kind = Event.NONSYNC_LITERAL
        if phase is Phase.COMMAND:
            return self._command_line(line, text if lit is None else text[: lit.start], kind)
        self.state.client_event(kind)
        if phase is Phase.SKIP_LINE:
            return None
        return Forward(self._rewritten(line, kind))

    def _rewritten(self, line: bytes, kind: Event) -> bytes:
        """The line to forward: a ``{n+}`` over the upstream's limit becomes ``{n}``."""
        if kind is not Event.BIG_NONSYNC_LITERAL:
            return line
        self._announce = True
        return rewrite_nonsync_literal(line, self.nonsync_literal_limit)[0]

    def _command_line(self, line: bytes, text: bytes, kind: Event) -> RelayEvent | None:
        tag, name, args_at = _head(text)
        name = name.upper()
        if name == b"UID":
            sub, _, rest = text[args_at + 1 :].partition(b" ")
            name = b"UID " + sub.upper()
            args_at = args_at + 1 + len(sub)
        refusal = self.state.command(tag, name, kind)
        if refusal is not None:
            return Reply(refusal.answer) if refusal.due else None
        arguments = text[args_at + 1 :] if args_at < len(text) else b""
        if kind is Event.LINE:
            return CommandLine(tag, name, arguments, line, None)
        return CommandLine(tag, name, arguments, self._rewritten(line, kind), self._literal_left)


# --------------------------------------------------------------------------- responses

_CRLF = b"\r\n"


def _text(text: str | bytes) -> bytes:
    """Human-readable response text on one line (CR, LF and NUL would break the framing)."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return raw.translate(None, b"\r\n\x00") or b"."


def prelogin_capabilities(*, starttls: bool, login_allowed: bool) -> list[str]:
    """mailgate's own capabilities before login on one connection."""
    caps = ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID"]
    if starttls:
        caps.append("STARTTLS")
    if login_allowed:
        caps += ["AUTH=PLAIN", "AUTH=LOGIN"]
    else:
        caps.append("LOGINDISABLED")
    return caps


def _caps(capabilities: Iterable[str | bytes]) -> bytes:
    return b" ".join(_text(c) for c in capabilities)


def greeting(capabilities: Iterable[str | bytes], text: str = "mailgate ready.") -> bytes:
    return b"* OK [CAPABILITY " + _caps(capabilities) + b"] " + _text(text) + _CRLF


def capability_response(capabilities: Iterable[str | bytes]) -> bytes:
    return b"* CAPABILITY " + _caps(capabilities) + _CRLF


def tagged(tag: bytes, status: str, text: str, code: str | bytes | None = None) -> bytes:
    """``tag OK|NO|BAD [code] text``; ``tag`` ``None``/empty gives an untagged ``*`` answer."""
    head = (tag or b"*") + b" " + status.encode("ascii")
    if code:
        head += b" [" + _text(code) + b"]"
    return head + b" " + _text(text) + _CRLF


def untagged(status: str, text: str, code: str | bytes | None = None) -> bytes:
    return tagged(b"*", status, text, code)


def bye(text: str) -> bytes:
    return b"* BYE " + _text(text) + _CRLF


def continuation(text: str | bytes = b"") -> bytes:
    """A ``+`` continuation request; ``text`` may be a base64 SASL challenge (or empty)."""
    raw = _text(text) if text else b""
    return b"+ " + raw + _CRLF


def quote(value: str | bytes) -> bytes:
    """An IMAP quoted string (for short, single-line values such as ID fields)."""
    return quote_string(_text(value) if value else b"")


def id_response(fields: Mapping[str, str]) -> bytes:
    """The untagged ``* ID (...)`` answer (RFC 2971)."""
    if not fields:
        return b"* ID NIL" + _CRLF
    inner = b" ".join(quote(k) + b" " + quote(v) for k, v in fields.items())
    return b"* ID (" + inner + b")" + _CRLF
