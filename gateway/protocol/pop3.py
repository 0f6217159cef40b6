"""Sans-IO core of mailgate's POP3 server side (RFC 1939, 2449, 2595, 3206, 5034).

Theory of operation
===================

This module turns bytes from a POP3 client into :class:`Command` objects and builds the
bytes mailgate sends back. It never touches a socket, imports no trio and keeps no
message in memory: the I/O driver (``gateway.frontends.pop3_session``) feeds it data and
writes what it returns.

Session states (RFC 1939 §3) and the commands each one accepts::

    state           commands accepted                                   leads to
    --------------  --------------------------------------------------  ---------------
    AUTHORIZATION   CAPA USER PASS* AUTH STLS QUIT                      TRANSACTION
                    (* PASS only right after a successful USER)         (login succeeded)
    TRANSACTION     CAPA STAT LIST UIDL RETR TOP DELE RSET NOOP QUIT    UPDATE (QUIT)
    UPDATE          nothing: the server applies deletions and closes    --

A QUIT in AUTHORIZATION closes the connection without entering UPDATE (RFC 1939 §4: the
state stays AUTHORIZATION, the session is only ``finished``); any other end of a session
(dropped connection, timeout) never enters UPDATE either, so nothing is deleted.
:class:`SessionState` tracks the state and answers which commands are legal;
:func:`parse_command` checks a command line against it and raises
:class:`CommandRejected` (answered ``-ERR reason``, counted as a bad command) for an
unknown command, a command in the wrong state or bad arguments.

Framing: :class:`LineReader` splits the input into lines of at most
:data:`MAX_COMMAND_LINE` octets (RFC 2449 §4: 255 including CRLF). A longer line is
reported once as :class:`LineTooLong` and skipped up to its end. SASL responses after
an ``AUTH`` continuation may be longer (:data:`MAX_SASL_LINE`, RFC 5034 §4). AUTH PLAIN's
message is decoded by :func:`gateway.protocol.sasl.decode_plain`, the one PLAIN decoder the
IMAP side uses too.

Message data: :class:`MessageEncoder` takes an RFC 822 message in chunks of any size and
split (as the upstream IMAP server sends it) and emits the multi-line POP3 body exactly
as Dovecot's POP3 server does: a bare LF becomes CRLF, a lone CR is passed on
unchanged, a line starting with "." gets another "." (byte-stuffing, only after LF, as
Dovecot), a CRLF is added when the message does not end with one, and ".CRLF" ends the
response. It also counts the POP3 octets (CRLF line ends, before byte-stuffing, not
counting the added final CRLF: the figure Dovecot's LIST reports) and, for TOP, passes
the header, the blank line and the first *k* body lines and then reports ``done`` so
the driver can stop fetching. The output for a message never depends on how its input
was split into chunks.
"""

from __future__ import annotations

import base64
import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

# -- limits ---------------------------------------------------------------------------

#: RFC 2449 §4: a command line is at most 255 octets including the CRLF.
MAX_COMMAND_LINE = 255
#: A SASL client response line after a "+ " continuation (RFC 5034 §4 lifts the 255
#: limit there); Dovecot's SASL buffer is 8192.
MAX_SASL_LINE = 8192
#: RFC 2449 §4: a response line (first line of a response) is at most 512 octets.
MAX_RESPONSE_LINE = 512
#: A message number or line count longer than this many digits is rejected outright.
MAX_NUMBER_DIGITS = 10
#: Largest message number or TOP line count accepted (fits a signed 32-bit integer).
MAX_NUMBER = 2**31 - 1

CRLF = b"\r\n"
TERMINATOR = b".\r\n"


class ProtocolError(Exception):
    """Base class of everything this module raises about client input."""


class LineTooLong(ProtocolError):
    """The client sent a line longer than the current limit (it is skipped)."""


class CommandRejected(ProtocolError):
    """A command the client may not send now: ``str()`` is the reason given with -ERR."""


# -- states and commands ------------------------------------------------------------


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


#: Which commands each state accepts (the table in the module docstring).
ALLOWED: dict[State, frozenset[str]] = {
    State.AUTHORIZATION: frozenset({"CAPA", "USER", "PASS", "AUTH", "STLS", "QUIT"}),
    State.TRANSACTION: frozenset(
        {"CAPA", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "NOOP", "QUIT"}
    ),
    State.UPDATE: frozenset(),
}
KNOWN_COMMANDS = frozenset().union(*ALLOWED.values()) | {"APOP"}


@dataclass(frozen=True)
class Command:
    """One parsed client command.

    ``name`` is upper-case. ``msg`` is the message number of LIST/UIDL/RETR/TOP/DELE
    (``None`` for LIST/UIDL without one), ``lines`` the TOP line count, ``arg`` the
    text argument of USER/PASS, ``mechanism``/``initial_response`` those of AUTH.
    """

    name: str
    msg: int | None = None
    lines: int | None = None
    arg: str | None = None
    mechanism: str | None = None
    initial_response: bytes | None = None


class SessionState:
    """Which RFC 1939 state the session is in and what USER said.

    The driver calls :meth:`user_accepted` after a USER it accepts, :meth:`logged_in`
    after a successful login and :meth:`quit` on QUIT. ``finished`` becomes true at QUIT
    in any state: the session is over and accepts no further command.
    """

    def __init__(self) -> None:
        self.state = State.AUTHORIZATION
        self.pending_user: str | None = None
        self.finished = False

    def allows(self, name: str) -> bool:
        if self.finished or name not in ALLOWED[self.state]:
            return False
        return name != "PASS" or self.pending_user is not None

    def user_accepted(self, name: str) -> None:
        self._require(State.AUTHORIZATION)
        self.pending_user = name

    def forget_user(self) -> None:
        self.pending_user = None

    def logged_in(self) -> None:
        self._require(State.AUTHORIZATION)
        self.pending_user = None
        self.state = State.TRANSACTION

    def quit(self) -> bool:
        """Record QUIT; True when it enters UPDATE (only from TRANSACTION, RFC 1939 §6).

        A QUIT in AUTHORIZATION (RFC 1939 §4) leaves the state as it is: nothing is updated.
        """
        self.finished = True
        self.pending_user = None
        if self.state is not State.TRANSACTION:
            return False
        self.state = State.UPDATE
        return True

    def _require(self, state: State) -> None:
        if self.finished:
            raise RuntimeError("not allowed after QUIT")
        if self.state is not state:
            raise RuntimeError(f"not allowed in state {self.state.value}")


# -- parsing --------------------------------------------------------------------------


_COMMAND_NAME = re.compile(rb"[A-Za-z]{1,8}")


def parse_command(line: bytes, session: SessionState) -> Command:
    """Parse one command line (without its line end) allowed in ``session``'s state.

    Raises :class:`CommandRejected` with a reason fit for ``-ERR``.
    """
    if not line.strip():
        raise CommandRejected("Empty command")
    keyword, _, rest = line.partition(b" ")
    if not _COMMAND_NAME.fullmatch(keyword):
        raise CommandRejected("Unknown command")
    name = keyword.decode("ascii").upper()
    if name == "APOP":
        raise CommandRejected("APOP is not supported, use USER/PASS or AUTH PLAIN")
    if name not in KNOWN_COMMANDS:
        raise CommandRejected(f"Unknown command: {name}")
    if not session.allows(name):
        if session.finished:
            raise CommandRejected("The session has ended")
        if name == "PASS" and session.state is State.AUTHORIZATION:
            raise CommandRejected("No username given (send USER first)")
        raise CommandRejected(f"{name} is not allowed in the {session.state.value} state")
    return _PARSERS[name](name, rest)


def _no_args(name: str, rest: bytes) -> Command:
    if rest.strip():
        raise CommandRejected(f"{name} takes no arguments")
    return Command(name)


def _words(rest: bytes) -> list[bytes]:
    return rest.split()


def _number(word: bytes, what: str, *, minimum: int) -> int:
    if not word.isdigit() or len(word) > MAX_NUMBER_DIGITS:
        raise CommandRejected(f"Invalid {what}")
    value = int(word)
    if value < minimum or value > MAX_NUMBER:
        raise CommandRejected(f"Invalid {what}")
    return value


def _optional_msg(name: str, rest: bytes) -> Command:
    words = _words(rest)
    if len(words) > 1:
        raise CommandRejected(f"{name} takes at most one argument")
    if not words:
        return Command(name)
    return Command(name, msg=_number(words[0], "message number", minimum=1))


def _required_msg(name: str, rest: bytes) -> Command:
    words = _words(rest)
    if len(words) != 1:
        raise CommandRejected(f"{name} needs a message number")
    return Command(name, msg=_number(words[0], "message number", minimum=1))


def _top(name: str, rest: bytes) -> Command:
    words = _words(rest)
    if len(words) != 2:
        raise CommandRejected("TOP needs a message number and a line count")
    msg = _number(words[0], "message number", minimum=1)
    lines = _number(words[1], "line count", minimum=0)
    return Command(name, msg=msg, lines=lines)


def _text_arg(name: str, rest: bytes) -> Command:
    # RFC 1939: PASS has exactly one argument, so spaces in it belong to the password.
    # USER is treated alike (user names here are config keys, checked by the caller).
    if not rest:
        raise CommandRejected(f"{name} needs an argument")
    try:
        text = rest.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandRejected(f"{name} argument is not valid UTF-8") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise CommandRejected(f"{name} argument contains control characters")
    return Command(name, arg=text)


def _auth(name: str, rest: bytes) -> Command:
    words = _words(rest)
    if not words:
        return Command(name)  # RFC 1734 style: list the mechanisms
    if len(words) > 2 or not re.fullmatch(rb"[A-Za-z0-9_-]{1,20}", words[0]):
        raise CommandRejected("Usage: AUTH mechanism [initial-response]")
    mechanism = words[0].decode("ascii").upper()
    initial = words[1] if len(words) == 2 else None
    return Command(name, mechanism=mechanism, initial_response=initial)


_PARSERS = {
    "CAPA": _no_args,
    "STLS": _no_args,
    "QUIT": _no_args,
    "STAT": _no_args,
    "RSET": _no_args,
    "NOOP": _no_args,
    "LIST": _optional_msg,
    "UIDL": _optional_msg,
    "RETR": _required_msg,
    "DELE": _required_msg,
    "TOP": _top,
    "USER": _text_arg,
    "PASS": _text_arg,
    "AUTH": _auth,
}


# -- line framing ---------------------------------------------------------------------


class LineReader:
    """Splits client input into lines (CRLF or a bare LF ends a line).

    ``limit`` is the longest line accepted, line end included; the driver raises it to
    :data:`MAX_SASL_LINE` while it waits for a SASL response. A longer line raises
    :class:`LineTooLong` once and the rest of it is skipped, so the next call returns the
    line after it.
    """

    def __init__(self, limit: int = MAX_COMMAND_LINE) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | None:
        """The next complete line without its line end, or ``None`` if more data is needed."""
        while True:
            end = self._buffer.find(b"\n")
            if self._skipping:
                if end < 0:
                    self._buffer.clear()
                    return None
                del self._buffer[: end + 1]
                self._skipping = False
                continue
            if end < 0:
                if len(self._buffer) >= self.limit:
                    self._buffer.clear()
                    self._skipping = True
                    raise LineTooLong("Line too long")
                return None
            if end + 1 > self.limit:
                del self._buffer[: end + 1]
                raise LineTooLong("Line too long")
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            return line[:-1] if line.endswith(b"\r") else line

    def discard_buffered(self) -> int:
        """Drop everything buffered (after STLS, RFC 2595 §3.1); returns how much."""
        dropped = len(self._buffer)
        self._buffer.clear()
        self._skipping = False
        return dropped

    @property
    def buffered(self) -> int:
        return len(self._buffer)


# -- responses -----------------------------------------------------------------------


class Code(str, enum.Enum):
    """Extended response codes (RFC 2449 §8, RFC 3206)."""

    IN_USE = "IN-USE"
    LOGIN_DELAY = "LOGIN-DELAY"
    SYS_TEMP = "SYS/TEMP"
    SYS_PERM = "SYS/PERM"
    AUTH = "AUTH"


def _status_line(status: bytes, text: str, code: Code | None) -> bytes:
    text = " ".join(text.split())  # no CR/LF or runs of blanks can reach the wire
    parts = [status]
    if code is not None:
        parts.append(f"[{code.value}]".encode("ascii"))
    if text:
        parts.append(text.encode("utf-8", "replace"))
    line = b" ".join(parts)
    if len(line) + len(CRLF) > MAX_RESPONSE_LINE:
        line = line[: MAX_RESPONSE_LINE - len(CRLF)]
    return line + CRLF


def ok(text: str = "", code: Code | None = None) -> bytes:
    return _status_line(b"+OK", text, code)


def err(text: str, code: Code | None = None) -> bytes:
    return _status_line(b"-ERR", text, code)


def continuation(challenge: bytes = b"") -> bytes:
    """A SASL continuation ``+ base64`` (RFC 5034 §4; PLAIN sends an empty one)."""
    return b"+ " + base64.b64encode(challenge) + CRLF


def stuff_line(line: bytes) -> bytes:
    return b"." + line if line.startswith(b".") else line


def multiline(first: bytes, lines: Iterable[bytes]) -> bytes:
    """A complete multi-line response: ``first`` (a status line), the byte-stuffed lines, ".".

    For short listings (CAPA, LIST, UIDL); message data goes through :class:`MessageEncoder`.
    """
    out = bytearray(first)
    for line in lines:
        out += stuff_line(line) + CRLF
    out += TERMINATOR
    return bytes(out)


def capability_lines(
    *,
    state: State,
    stls_available: bool,
    user_login_allowed: bool,
    sasl_mechanisms: Iterable[str],
    implementation: str | None,
) -> list[bytes]:
    """CAPA (RFC 2449 §5, RFC 2595 §4) for the current state.

    USER and SASL are only listed while the client may still log in (and only if
    password login is allowed on this connection); STLS only before login without TLS.
    """
    caps: list[str] = ["TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"]
    if state is State.AUTHORIZATION:
        if user_login_allowed:
            caps.append("USER")
            mechs = " ".join(sasl_mechanisms)
            if mechs:
                caps.append(f"SASL {mechs}")
        if stls_available:
            caps.append("STLS")
    if implementation:
        caps.append(f"IMPLEMENTATION {implementation}")
    return [c.encode("ascii") for c in caps]


def scan_listing(msg: int, value: int | str) -> bytes:
    """One LIST/UIDL answer: ``msg value`` (also the single-line form's text)."""
    return f"{msg} {value}".encode("ascii")


# -- message data: CRLF normalising, TOP, byte-stuffing ------------------------------


class _CrlfNormaliser:
    """Bare LF → CRLF, lone CR unchanged, independent of chunk boundaries.

    A chunk's trailing CR is held back until the next byte shows whether it starts a
    CRLF; :meth:`flush` releases it at the end of the message.
    """

    def __init__(self) -> None:
        self._held_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if chunk.count(b"\n") == chunk.count(b"\r\n"):
            return chunk  # the usual case: no bare LF (counting is cheaper than copying)
        # Collapsing CRLF first keeps lone CRs and turns every LF into exactly one CRLF.
        return chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    def flush(self) -> bytes:
        if self._held_cr:
            self._held_cr = False
            return b"\r"
        return b""


class _TopFilter:
    """Passes normalised data through the header's blank line and then ``body_lines`` lines.

    Input is CRLF-normalised (every LF is preceded by CR). A body line ends at LF.
    """

    def __init__(self, body_lines: int) -> None:
        self._remaining = body_lines
        self._in_body = False
        self._at_line_start = True
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return b""
        cut = len(data)
        position = 0
        if not self._in_body:
            end = self._header_end(data)
            if end is None:
                self._at_line_start = data.endswith(b"\n")
                return data
            self._in_body = True
            position = end
        if self._in_body:
            cut = self._count_body(data, position)
        return data[:cut]

    def _header_end(self, data: bytes) -> int | None:
        """Offset just past the blank line ending the header, if it is in ``data``."""
        if self._at_line_start and data.startswith(b"\r\n"):
            return 2
        index = data.find(b"\n\r\n")
        if index >= 0:
            return index + 3
        return None

    def _count_body(self, data: bytes, position: int) -> int:
        if self._remaining == 0:
            self.done = True
            return position
        while position < len(data):
            end = data.find(b"\n", position)
            if end < 0:
                return len(data)
            position = end + 1
            self._remaining -= 1
            if self._remaining == 0:
                self.done = True
                return position
        return len(data)


class MessageEncoder:
    """Streams one message into a POP3 multi-line body (RETR, or TOP with ``top_lines``).

    ``feed(chunk)`` returns the bytes to send for that chunk (possibly empty);
    ``finish()`` returns the rest: a held-back CR, the final CRLF if the data did not
    end with one, and the ".CRLF" terminator. ``octets`` counts the bytes sent so far
    without byte-stuffing and without the added final CRLF: after a complete RETR it
    is the message's POP3 size. ``done`` becomes true once TOP has all it needs; later
    input is ignored.
    """

    def __init__(self, top_lines: int | None = None) -> None:
        self._normaliser = _CrlfNormaliser()
        self._top = _TopFilter(top_lines) if top_lines is not None else None
        self._at_line_start = True  # the next output byte starts a line
        self._sent_anything = False
        self.octets = 0
        self._finished = False

    @property
    def done(self) -> bool:
        return self._top is not None and self._top.done

    def feed(self, chunk: bytes) -> bytes:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self.done:
            return b""
        return self._emit(self._normaliser.feed(chunk))

    def finish(self) -> bytes:
        if self._finished:
            raise RuntimeError("finish() called twice")
        tail = b"" if self.done else self._emit(self._normaliser.flush())
        self._finished = True
        if not self._at_line_start:
            tail += CRLF
        return tail + TERMINATOR

    def _emit(self, data: bytes) -> bytes:
        if self._top is not None:
            data = self._top.feed(data)
        if not data:
            return b""
        self.octets += len(data)
        # No "." at all (base64 attachments): skip the two-byte search, about 10x slower
        # than this one-byte scan (docs/performance.md).
        stuffed = data.replace(b"\n.", b"\n..") if b"." in data else data
        if self._at_line_start and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        self._at_line_start = data.endswith(b"\n")
        return stuffed
