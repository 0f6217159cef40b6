"""Sans-IO core of mailgate's SMTP submission: both directions of one SMTP grammar.

Theory of operation
===================

This module parses what an SMTP client sends (mailgate is the submission server, RFC 6409)
and what an SMTP server answers (mailgate is the client of the provider's submission server),
and builds the bytes going the other way. It imports no trio and does no I/O: the front end
(``gateway.frontends.smtp_session``) and the upstream client (``gateway.upstream.smtp``) feed
it bytes and write what it returns. Everything it raises for bad input is a
:class:`SmtpError`.

Rules
-----

1. **Session states** (RFC 5321 §4.1.4, RFC 3207, RFC 4954, RFC 3030). :class:`SessionState`
   tracks them; :func:`parse_command` rejects a command the state does not allow with
   ``503 5.5.1`` before its arguments are looked at::

       state     commands accepted                                         leads to
       --------  --------------------------------------------------------  ----------------
       INITIAL   EHLO HELO NOOP RSET QUIT HELP VRFY                         READY (EHLO/HELO)
       READY     + STARTTLS AUTH MAIL                                       MAIL (MAIL)
       MAIL      EHLO HELO NOOP RSET QUIT HELP VRFY RCPT                    RCPT (first 250)
       RCPT      + DATA BDAT                                                CHUNKING (BDAT)
       CHUNKING  BDAT RSET NOOP QUIT (RFC 3030 §2: only BDAT until LAST)    READY (LAST)

   EHLO, HELO and RSET end a transaction (RFC 5321 §4.1.1.1, §4.1.1.5); a successful
   STARTTLS forgets everything (RFC 3207 §4.2: back to INITIAL); DATA goes to the data phase,
   which the driver ends with :meth:`SessionState.transaction_done` (back to READY).
   Whether the client is authenticated, and whether MAIL is allowed without it (relay mode),
   is the driver's business, not this table's.

2. **Command lines** (RFC 5321 §4.5.3.1.4: 512 octets; §4.1.1 case-insensitive verbs). The
   :class:`CommandReader` splits input at LF (a preceding CR is dropped), at most ``limit``
   octets a line: a longer line raises :class:`LineTooLong` once and is skipped to its end.
   The limit is :data:`MAX_COMMAND_LINE` (512 plus room for the parameters of SIZE, DSN and
   AUTH=, RFC 5321 §4.5.3.1.4 allows extensions to grow it) and :data:`MAX_SASL_LINE` for an
   AUTH line or a SASL response (RFC 4954 §4: 12288).

3. **Paths and parameters** (RFC 5321 §4.1.2). ``MAIL FROM:<path> params`` and ``RCPT
   TO:<path> params``: the path is kept as sent (between the angle brackets) so that the
   upstream sees it unchanged; parameters are ``KEYWORD[=value]``. Only parameters of
   extensions mailgate advertised are accepted (``555 5.5.4`` otherwise): ``SIZE``, ``BODY``
   (``7BIT``, ``8BITMIME``; ``BINARYMIME`` with CHUNKING), ``SMTPUTF8`` and ``AUTH=``.
   Non-ASCII in a path needs SMTPUTF8 (RFC 6531 §3.4).

4. **Message data** (RFC 5321 §4.5.2, §4.1.1.4). :class:`DataScanner` finds the end of the
   data, ``CRLF . CRLF``, in input split anywhere (the data phase starts at a line start),
   and hands back the bytes *as received* -- dot-stuffing included -- so the driver relays them
   byte for byte, terminator included; what follows the terminator (pipelined commands) is
   returned apart. It counts the octets and refuses (stops handing on data, keeps looking
   for the end) when the message is larger than its ``max_size``, or when a line consisting
   of a lone dot ends or starts with a bare LF (``LF . LF``, ``LF . CRLF`` without CR before,
   ``CRLF . LF``): servers disagree on those, and relaying one unchanged would let a client
   smuggle a second message past mailgate's checks (the 2023 "SMTP smuggling" class).

5. **BDAT** (RFC 3030 §2): ``BDAT size [LAST]`` is followed by exactly ``size`` octets, no
   stuffing; the driver takes them with :meth:`CommandReader.take`.

6. **Replies** (RFC 5321 §4.2, RFC 2034/3463). :func:`reply` builds one (multi-line with
   ``NNN-``), with an enhanced status code on each line except for the greeting and EHLO.
   :class:`ReplyParser` parses a server's replies from input split anywhere into
   :class:`Reply` objects (code, lines, enhanced code); a line longer than
   :data:`MAX_REPLY_LINE`, more than :data:`MAX_REPLY_LINES` lines, or a line that is not
   ``NNN[ -]text`` raises :class:`ReplyError`. :meth:`Reply.wire` relays a reply unchanged.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MAX_COMMAND_LINE",
    "MAX_SASL_LINE",
    "Command",
    "CommandReader",
    "CommandRejected",
    "DataScanner",
    "LineTooLong",
    "Reply",
    "ReplyError",
    "ReplyParser",
    "SessionState",
    "SmtpError",
    "State",
    "ehlo_reply",
    "parse_command",
    "reply",
]

# -- limits -------------------------------------------------------------------------------

#: Longest command line accepted, CRLF included (RFC 5321 §4.5.3.1.4 is 512 without
#: extension parameters; DSN's ORCPT/ENVID and AUTH= can each add up to 500).
MAX_COMMAND_LINE = 2048
#: An AUTH command or SASL response line (RFC 4954 §4).
MAX_SASL_LINE = 12288
#: Longest reply line accepted from a server (RFC 5321 §4.5.3.1.5: 512; with room).
MAX_REPLY_LINE = 4096
#: Most lines in one server reply (EHLO answers have about 15).
MAX_REPLY_LINES = 100
#: Longest path between the angle brackets (RFC 5321 §4.5.3.1.3: 256).
MAX_PATH = 256
#: Most parameters after a path.
MAX_PARAMS = 10
#: Longest BDAT size or SIZE= value, in digits.
MAX_NUMBER_DIGITS = 15

CRLF = b"\r\n"
END_OF_DATA = b"\r\n.\r\n"


class SmtpError(Exception):
    """Base class of everything this module raises about its input."""


class LineTooLong(SmtpError):
    """A client line longer than the reader's limit (it is skipped)."""


class CommandRejected(SmtpError):
    """A command the client may not send now, or malformed: answered with :attr:`wire`."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def wire(self) -> bytes:
        return reply(self.code, self.text, self.enhanced)


class ReplyError(SmtpError):
    """A server reply that is not SMTP."""


def _syntax(text: str) -> CommandRejected:
    return CommandRejected(501, "5.5.4", text)


# -- states ------------------------------------------------------------------------------


class State(enum.Enum):
    INITIAL = "INITIAL"
    READY = "READY"
    MAIL = "MAIL"
    RCPT = "RCPT"
    CHUNKING = "CHUNKING"


_ANY = frozenset({"EHLO", "HELO", "NOOP", "RSET", "QUIT", "HELP", "VRFY"})

#: Which commands each state accepts (the table in the module docstring).
ALLOWED: dict[State, frozenset[str]] = {
    State.INITIAL: _ANY,
    State.READY: _ANY | {"STARTTLS", "AUTH", "MAIL"},
    State.MAIL: _ANY | {"RCPT"},
    State.RCPT: _ANY | {"RCPT", "DATA", "BDAT"},
    # RFC 3030 §2: once BDAT started, only BDAT (and RSET, QUIT, NOOP) until LAST.
    State.CHUNKING: frozenset({"BDAT", "RSET", "NOOP", "QUIT"}),
}
KNOWN_COMMANDS = frozenset().union(*ALLOWED.values()) | {"EXPN", "TURN", "ETRN", "SEND", "SOML", "SAML"}


class SessionState:
    """The RFC 5321 session state; the driver moves it after each reply it sends."""

    def __init__(self) -> None:
        self.state = State.INITIAL
        self.esmtp = False  # EHLO (not HELO): extensions may be used

    def allows(self, name: str) -> bool:
        return name in ALLOWED[self.state]

    # RFC 5321 §4.1.1.1: EHLO/HELO reset the state as RSET does.
    def greeted(self, *, esmtp: bool) -> None:
        self.state = State.READY
        self.esmtp = esmtp

    # RFC 3207 §4.2: after TLS the client must start over with EHLO.
    def tls_started(self) -> None:
        self.state = State.INITIAL
        self.esmtp = False

    # RFC 5321 §4.1.1.5: RSET aborts the transaction, the greeting stays.
    def reset(self) -> None:
        if self.state is not State.INITIAL:
            self.state = State.READY

    # RFC 5321 §4.1.1.2: MAIL starts a transaction.
    def mail_accepted(self) -> None:
        self._require(State.READY)
        self.state = State.MAIL

    # RFC 5321 §4.1.1.3: DATA needs at least one accepted recipient.
    def rcpt_accepted(self) -> None:
        if self.state is State.MAIL:
            self.state = State.RCPT

    # RFC 3030 §2: a BDAT that is not LAST keeps the transaction in chunking.
    def chunk_accepted(self, *, last: bool) -> None:
        self.state = State.READY if last else State.CHUNKING

    # RFC 5321 §4.1.1.4: after the data (accepted or not) the transaction is over.
    def transaction_done(self) -> None:
        self.state = State.READY

    def _require(self, state: State) -> None:
        if self.state is not state:
            raise RuntimeError(f"not allowed in state {self.state.value}")


# -- commands ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One parsed client command.

    ``name`` is upper-case. ``domain``: EHLO/HELO's argument. ``path``: MAIL/RCPT's path as sent
    between the angle brackets (``""`` for the null reverse-path), ``params`` its parameters
    (keyword upper-cased, value as sent), ``raw_params`` the parameter text as sent.
    ``size``/``last``: BDAT's. ``mechanism``/``initial_response``: AUTH's.
    """

    name: str
    domain: str | None = None
    path: str | None = None
    params: tuple[tuple[str, str | None], ...] = ()
    raw_params: str = ""
    size: int | None = None
    last: bool = False
    mechanism: str | None = None
    initial_response: bytes | None = None

    def param(self, keyword: str) -> str | None:
        for key, value in self.params:
            if key == keyword:
                return value
        return None


@dataclass(frozen=True)
class Extensions:
    """What the session advertised in its EHLO reply: which parameters MAIL/RCPT may carry."""

    size: bool = True
    eightbitmime: bool = True
    smtputf8: bool = False
    chunking: bool = False
    auth: bool = True


_VERB = re.compile(rb"[A-Za-z]{1,10}")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_DOMAIN_ARG = re.compile(r"[^\s<>]{1,255}")
_MECHANISM = re.compile(rb"[A-Za-z0-9_-]{1,20}")


def parse_command(line: bytes, session: SessionState, ext: Extensions = Extensions()) -> Command:
    """Parse one command line (without its line end) allowed in ``session``'s state.

    Raises :class:`CommandRejected` with the reply to send.
    """
    verb, _, rest = line.partition(b" ")
    if not _VERB.fullmatch(verb):
        raise CommandRejected(500, "5.5.2", "Syntax error, command unrecognized")
    name = verb.decode("ascii").upper()
    if name not in KNOWN_COMMANDS:
        raise CommandRejected(500, "5.5.2", "Syntax error, command unrecognized")
    if name not in _PARSERS:
        raise CommandRejected(502, "5.5.1", f"{name} is not implemented")
    if not session.allows(name):
        raise CommandRejected(503, "5.5.1", _sequence_hint(name, session.state))
    if name == "BDAT" and not session.esmtp:
        raise CommandRejected(503, "5.5.1", "BDAT needs EHLO")
    return _PARSERS[name](name, rest, ext, session)


def _sequence_hint(name: str, state: State) -> str:
    if state is State.INITIAL:
        return f"Bad sequence of commands: send EHLO before {name}"
    if name == "RCPT":
        return "Bad sequence of commands: send MAIL first"
    if name in ("DATA", "BDAT"):
        return "Bad sequence of commands: no valid recipients"
    if name == "MAIL":
        return "Bad sequence of commands: a transaction is already in progress (RSET first)"
    if state is State.CHUNKING:
        return f"Bad sequence of commands: {name} is not allowed after BDAT without LAST"
    return f"Bad sequence of commands: {name} is not allowed now"


def _text(rest: bytes, *, utf8: bool) -> str:
    try:
        text = rest.decode("utf-8" if utf8 else "ascii")
    except UnicodeDecodeError:
        raise _syntax("Syntax error: 8-bit characters need SMTPUTF8" if not utf8
                      else "Syntax error: not valid UTF-8") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise _syntax("Syntax error: control characters in the command")
    return text


def _no_args(name: str, rest: bytes, ext: Extensions, session: SessionState) -> Command:
    if rest.strip():
        raise _syntax(f"Syntax error: {name} takes no arguments")
    return Command(name)


def _any_args(name: str, rest: bytes, ext: Extensions, session: SessionState) -> Command:
    # NOOP, HELP and VRFY may carry an argument (RFC 5321 §4.1.1.9, §4.1.1.8, §4.1.1.6).
    return Command(name)


def _hello(name: str, rest: bytes, ext: Extensions, session: SessionState) -> Command:
    # RFC 5321 §4.1.1.1: EHLO domain / address-literal.
    domain = _text(rest, utf8=True).strip()
    if not _DOMAIN_ARG.fullmatch(domain):
        raise _syntax(f"Syntax error: {name} needs a domain name or address literal")
    return Command(name, domain=domain)


def _path_command(name: str, rest: bytes, ext: Extensions, session: SessionState) -> Command:
    # RFC 5321 §4.1.1.2-3: "MAIL FROM:" Reverse-path [SP Mail-parameters]
    prefix = "FROM:" if name == "MAIL" else "TO:"
    text = _text(rest, utf8=ext.smtputf8)
    if not text[: len(prefix)].upper() == prefix:
        raise _syntax(f"Syntax error: use {name} {prefix}<address>")
    text = text[len(prefix):].lstrip(" ")  # a space after the colon is a common client habit
    if not text.startswith("<"):
        raise _syntax("Syntax error: the address must be enclosed in <>")
    end = text.find(">")
    if end < 0:
        raise _syntax("Syntax error: the address must be enclosed in <>")
    path = text[1:end]
    raw_params = text[end + 1:].strip(" ")
    if end + 1 < len(text) and text[end + 1] != " ":
        raise _syntax("Syntax error: a space must separate the address and its parameters")
    if len(path) > MAX_PATH or any(c in path for c in " <>\\\"") and not path.startswith('"'):
        raise _syntax("Syntax error in the address")
    if path.startswith("@"):  # RFC 5321 §4.1.2: a source route, to be ignored
        path = path.split(":", 1)[1] if ":" in path else ""
    if name == "RCPT" and (not path or "@" not in path):
        raise _syntax("Syntax error: the recipient needs a domain (user@domain)")
    if name == "MAIL" and path and "@" not in path:
        raise _syntax("Syntax error: the sender needs a domain (user@domain)")
    params = _params(name, raw_params, ext)
    return Command(name, path=path, params=params, raw_params=raw_params)


def _params(name: str, raw: str, ext: Extensions) -> tuple[tuple[str, str | None], ...]:
    words = raw.split()
    if len(words) > MAX_PARAMS:
        raise _syntax("Syntax error: too many parameters")
    params: list[tuple[str, str | None]] = []
    for word in words:
        key, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not value):
            raise _syntax(f"Syntax error in parameter {word[:40]!r}")
        key = key.upper()
        _check_param(name, key, value if eq else None, ext)
        params.append((key, value if eq else None))
    return tuple(params)


def _check_param(name: str, key: str, value: str | None, ext: Extensions) -> None:
    unknown = CommandRejected(555, "5.5.4", f"{name} parameter {key} is not supported")
    if name == "RCPT":
        raise unknown  # DSN is not advertised: RCPT takes no parameters here
    if key == "SIZE" and ext.size:
        # RFC 1870 §6
        if value is None or not value.isdigit() or len(value) > MAX_NUMBER_DIGITS:
            raise _syntax("Syntax error: SIZE needs a number")
    elif key == "BODY" and ext.eightbitmime:
        # RFC 6152 §2, RFC 3030 §3 (BINARYMIME needs CHUNKING)
        allowed = {"7BIT", "8BITMIME"} | ({"BINARYMIME"} if ext.chunking else set())
        if value is None or value.upper() not in allowed:
            raise CommandRejected(501, "5.5.4", f"BODY must be one of {', '.join(sorted(allowed))}")
    elif key == "SMTPUTF8" and ext.smtputf8:
        if value is not None:  # RFC 6531 §3.4
            raise _syntax("Syntax error: SMTPUTF8 takes no value")
    elif key == "AUTH" and ext.auth:
        if value is None:  # RFC 4954 §5
            raise _syntax("Syntax error: AUTH= needs a value")
    else:
        raise unknown


def _data(name: str, rest: bytes, ext: Extensions, session: SessionState) -> Command:
    return _no_args(name, rest, ext, session)


def _bdat(name: str, rest: bytes, ext: Extensions, session: SessionState) -> Command:
    # RFC 3030 §2: "BDAT" SP chunk-size [ SP end-marker ]
    if not ext.chunking:
        raise CommandRejected(502, "5.5.1", "BDAT is not offered here")
    words = rest.split(b" ")
    if not 1 <= len(words) <= 2 or not words[0].isdigit() or len(words[0]) > MAX_NUMBER_DIGITS:
        raise _syntax("Syntax error: use BDAT <size> [LAST]")
    last = len(words) == 2
    if last and words[1].upper() != b"LAST":
        raise _syntax("Syntax error: use BDAT <size> [LAST]")
    return Command(name, size=int(words[0]), last=last)


def _auth(name: str, rest: bytes, ext: Extensions, session: SessionState) -> Command:
    # RFC 4954 §4: AUTH mechanism [initial-response]
    words = rest.split(b" ")
    if not 1 <= len(words) <= 2 or not _MECHANISM.fullmatch(words[0]):
        raise _syntax("Syntax error: use AUTH <mechanism> [initial-response]")
    initial = words[1] if len(words) == 2 else None
    return Command(name, mechanism=words[0].decode("ascii").upper(), initial_response=initial)


_PARSERS = {
    "EHLO": _hello,
    "HELO": _hello,
    "MAIL": _path_command,
    "RCPT": _path_command,
    "DATA": _data,
    "BDAT": _bdat,
    "RSET": _no_args,
    "QUIT": _no_args,
    "STARTTLS": _no_args,
    "NOOP": _any_args,
    "HELP": _any_args,
    "VRFY": _any_args,
    "AUTH": _auth,
}


# -- client input framing ----------------------------------------------------------------


class _InputBuffer:
    """Octets received and not consumed yet; the readers of both directions build on it."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        self._data += data

    @property
    def buffered(self) -> int:
        return len(self._data)


class CommandReader(_InputBuffer):
    """The client's input buffer: command lines, and raw octets for BDAT and DATA.

    ``limit`` is the longest line accepted, line end included. A longer line raises
    :class:`LineTooLong` once and the rest of it is skipped.
    """

    def __init__(self, limit: int = MAX_COMMAND_LINE) -> None:
        super().__init__()
        self.limit = limit
        self._skip_to_eol = False

    def next_line(self) -> bytes | None:
        """The next complete line without CRLF (or bare LF); ``None`` if more data is needed."""
        eol = self._data.find(b"\n")
        if self._skip_to_eol:
            if eol < 0:
                self._data.clear()
                return None
            self._skip_to_eol = False
            del self._data[: eol + 1]
            return self.next_line()
        too_long = eol + 1 > self.limit if eol >= 0 else len(self._data) >= self.limit
        if too_long:
            if eol < 0:
                self._data.clear()
                self._skip_to_eol = True
            else:
                del self._data[: eol + 1]
            raise LineTooLong(f"line longer than {self.limit} octets")
        if eol < 0:
            return None
        cut = eol - 1 if eol > 0 and self._data[eol - 1] == 0x0D else eol
        line = bytes(self._data[:cut])
        del self._data[: eol + 1]
        return line

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` buffered octets, as they are (BDAT chunks, the start of DATA)."""
        chunk = bytes(self._data[:limit])
        del self._data[:limit]
        return chunk

    def discard_buffered(self) -> int:
        """Drop everything buffered (RFC 3207 §4.2: nothing sent before TLS counts)."""
        dropped = len(self._data)
        self._data.clear()
        self._skip_to_eol = False
        return dropped


# -- message data --------------------------------------------------------------------------



def _bare_lf_dot(window: bytes, skip: int, stop: int) -> int | None:
    """Where a lone-dot line with a bare LF on either side starts in ``window[:stop]`` (rule 4:
    ``LF . LF``, ``LF . CRLF`` without CR before the LF, ``CRLF . LF``), if anywhere.

    Only ``LF .`` needs a look (message data rarely has it, so the scan costs one ``find``);
    a match lying wholly in the first ``skip`` octets (the carried tail) was judged before.
    """
    pos = window.find(b"\n.", 0, stop)
    while pos >= 0:
        after = window[pos + 2:pos + 4]
        if after[:1] == b"\n" and pos + 3 > skip:
            return pos
        if after == b"\r\n" and pos + 4 > skip and (pos == 0 or window[pos - 1] != 0x0D):
            return pos
        pos = window.find(b"\n.", pos + 1, stop)
    return None


@dataclass(frozen=True)
class DataStep:
    """What :meth:`DataScanner.feed` made of one piece of input.

    ``forward``: octets to relay upstream now, as received. ``done``: the end of data was in
    this piece (and ``forward`` ends with ``CRLF.CRLF`` unless the message was refused).
    ``rest``: input after the end of data (pipelined commands).
    """

    forward: bytes
    done: bool
    rest: bytes = b""


class DataScanner:
    """Finds the end of DATA in input split anywhere; see rule 4 of the module docstring.

    ``size`` counts the message octets before the terminator, as received (with stuffing).
    ``refusal`` becomes ``"size"`` or ``"bare_lf"`` once the message must not be relayed;
    from then on nothing more is forwarded, but the end of data is still found.
    """

    def __init__(self, max_size: int | None = None) -> None:
        self.max_size = max_size
        self.size = 0
        self.refusal: str | None = None
        self.done = False
        self._tail = CRLF  # the data phase starts at the beginning of a line

    def feed(self, data: bytes) -> DataStep:
        if self.done:
            raise RuntimeError("the end of data was already found")
        # The tail (at most 4 octets, the terminator has 5) carries a match across pieces;
        # every match found in the window therefore contains at least one new octet.
        window = self._tail + data
        skip = len(self._tail)
        end = window.find(END_OF_DATA)
        stop = len(window) if end < 0 else end + len(END_OF_DATA)
        forward = window[skip:stop]
        # The message octets end with the CRLF before the terminating dot; octets of the
        # terminator counted with an earlier piece (at most 3) are taken back.
        self.size += len(data) if end < 0 else end + 2 - skip
        if self.refusal is not None:
            forward = b""
        elif (bad := _bare_lf_dot(window, skip, stop)) is not None:
            self.refusal = "bare_lf"
            forward = window[skip:max(bad, skip)]  # what came before it may go
        elif self.max_size is not None and self.size > self.max_size:
            self.refusal = "size"
            forward = b""
        if end < 0:
            self._tail = window[-4:]
            return DataStep(forward=forward, done=False)
        self.done = True
        return DataStep(forward=forward, done=True, rest=window[stop:])


# -- replies ----------------------------------------------------------------------------


def reply(code: int, text: str | Iterable[str], enhanced: str | None = None) -> bytes:
    """One reply; ``text`` may be several lines; ``enhanced`` goes on every line (RFC 2034)."""
    lines = [text] if isinstance(text, str) else list(text) or [""]
    prefix = f"{enhanced} " if enhanced else ""
    out = []
    for i, line in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        out.append(f"{code}{sep}{prefix}{line}".rstrip(" ") + "\r\n")
    return "".join(out).encode("utf-8")


def ehlo_reply(hostname: str, client_domain: str, extensions: Iterable[str]) -> bytes:
    """The EHLO reply: greeting line, then one extension a line (no enhanced codes there)."""
    return reply(250, [f"{hostname} greets {client_domain}", *extensions])


_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


@dataclass(frozen=True)
class Reply:
    """One server reply: the code and the text of each line (after ``NNN-``/``NNN ``)."""

    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str | None:
        """The enhanced status code of the first line (RFC 3463), if it carries one whose
        class matches the reply's."""
        match = _ENHANCED.match(self.lines[0]) if self.lines else None
        if match is None or match.group(1) != str(self.code)[0]:
            return None
        return match.group(0).strip()

    @property
    def text(self) -> str:
        """The lines joined by spaces, without the enhanced codes."""
        parts = []
        for line in self.lines:
            match = _ENHANCED.match(line)
            parts.append(line[match.end():] if match else line)
        return " ".join(p for p in parts if p)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    def wire(self) -> bytes:
        """The reply as the server sent it (relayed unchanged to the client)."""
        return reply(self.code, self.lines)

    def __str__(self) -> str:
        return f"{self.code} {' / '.join(self.lines)}"


_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)", re.S)


class ReplyParser(_InputBuffer):
    """Parses a server's replies from input split anywhere (rule 6)."""

    def __init__(self) -> None:
        super().__init__()
        self._lines: list[str] = []
        self._code: int | None = None

    def next_reply(self) -> Reply | None:
        """The next complete reply, or ``None`` if more data is needed."""
        while True:
            eol = self._data.find(b"\n")
            if eol < 0:
                if len(self._data) > MAX_REPLY_LINE:
                    raise ReplyError("reply line too long")
                return None
            if eol + 1 > MAX_REPLY_LINE:
                raise ReplyError("reply line too long")
            raw = bytes(self._data[:eol]).rstrip(b"\r")
            del self._data[: eol + 1]
            match = _REPLY_LINE.fullmatch(raw)
            if match is None:
                raise ReplyError(f"not an SMTP reply line: {raw[:60]!r}")
            code = int(match.group(1))
            if self._code is not None and code != self._code:
                raise ReplyError("reply lines with different codes")
            self._code = code
            self._lines.append(match.group(3).decode("utf-8", "replace"))
            if len(self._lines) > MAX_REPLY_LINES:
                raise ReplyError("reply has too many lines")
            if match.group(2) != b"-":
                done = Reply(code, tuple(self._lines))
                self._lines, self._code = [], None
                return done
