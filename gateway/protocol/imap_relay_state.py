"""Sans-IO state of a relayed IMAP session: one place for everything the relay knows.

Theory of operation
-------------------
Rule 1: everything that affects the relay's state lives in this module. The client's side is a
finite automaton whose transitions are all in one table, :data:`TRANSITIONS`; what does not fit
a finite automaton (the ordered list of commands in flight, the selected mailbox) is kept here
too, next to it.

Rule 2: this module frames no bytes and does no I/O. :class:`~gateway.protocol.imap_commands.
CommandRelay` frames the client's stream and reports each line and literal end as an
:class:`Event`; the driver (``gateway.frontends.imap_relay``) reports the upstream's ``+``,
tagged responses and ``* BYE``, and executes what comes back (forward or drop, relay or
swallow, write mailgate's own answer now or later). Neither keeps session state of its own
(the framer counts the octets left of a literal, nothing more).

Rule 3: responses reach the client in command order. A command mailgate answers itself
(:data:`REFUSED`) is answered once every command the client sent before it has had its tagged
response relayed, right after the last of them (so a ``BAD`` pipelined after ``IDLE``/``DONE``
follows the IDLE's tagged ``OK``).

The command in progress (:class:`Phase`)::

    phase         the client's next bytes are                       the upstream's
    ------------  ------------------------------------------------  -------------------------
    COMMAND       the first line of a command                       --
    LINE          the line that follows a literal                   --
    LITERAL       literal octets, passed upstream                   --
    SYNC_LITERAL  literal octets after the "+" the client waits for  "+" (relayed) or tagged
    OUR_LITERAL   held: mailgate sent {n} for the client's {n+}     "+" (swallowed) or tagged
    SKIP_LITERAL  literal octets of a refused command, dropped      --
    SKIP_LINE     the line after a dropped literal, dropped         --
    IDLE          lines passed upstream; DONE ends IDLE             tagged (IDLE refused/over)

Events come from the client's lines (classified by the literal announced at the end of the
line, ``{n}``, ``{n+}``, or none), from the relay's own decision to answer a command itself
(:attr:`Event.REFUSED`, fired right after the command's first line) and from the upstream
(:attr:`Event.CONTINUATION`, and :attr:`Event.TAGGED` for a tagged response to the command in
progress). A client event missing from the table is a framing bug (``RuntimeError``); an
upstream event missing from it leaves the phase alone (a ``+`` is then relayed).

Commands in flight: every command sent upstream, in order, until its tagged response; mailgate's
own answers wait in the same queue (rule 3). From them and a few flags come the answers a driver
(or a future pool of upstream connections) needs: is a command half sent, is IDLE running, does
the upstream owe an answer (the stall deadline), is a mailbox selected (``SELECT``/``EXAMINE``
OK selects, ``NO`` deselects, ``CLOSE``/``UNSELECT`` OK deselects), was LOGOUT sent, was BYE
seen — and :attr:`RelayState.clean`: all of these at rest.

Rule 4: whatever a command leaves on the connection beyond its own answer *taints* it for the
pool of upstream connections (:mod:`gateway.upstream.pool`): ``ENABLE``, ``COMPRESS``,
``NOTIFY``, ``STARTTLS``, ``CONDSTORE``/``QRESYNC`` (enabled by ``SELECT … (CONDSTORE)``, a
``MODSEQ`` search, ``CHANGEDSINCE``, ``UNCHANGEDSINCE``), and any command not listed in
:data:`RESTING_COMMANDS` (anything doubtful). :attr:`RelayState.tainted` never goes back;
:attr:`RelayState.hand_back_ok` says whether the client's ``LOGOUT`` just received may be
answered by mailgate and the connection kept: it is the only command in flight, nothing else
is half sent or unanswered, nothing tainted the connection, no ``* BYE`` came.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "LITERAL_PHASES",
    "LOGOUT_COMMAND",
    "LASTING_WORDS",
    "REFUSED",
    "RESTING_COMMANDS",
    "TRANSITIONS",
    "Event",
    "Phase",
    "Refusal",
    "RelayState",
]

#: What mailgate sends upstream when the client left without logging out.
LOGOUT_COMMAND: Final = b"MG0 LOGOUT\r\n"

#: Commands mailgate answers itself after login (``BAD``), with the reason given to the client.
REFUSED: Final[Mapping[bytes, bytes]] = {
    b"STARTTLS": b"STARTTLS is not available after login.",
    b"COMPRESS": b"COMPRESS is not supported by this server.",
    b"LOGIN": b"Already logged in.",
    b"AUTHENTICATE": b"Already logged in.",
}


#: Commands whose effect ends with their answer or with the selected mailbox (which the pool
#: leaves with UNSELECT): a session that used only these leaves nothing for the next (rule 4).
RESTING_COMMANDS: Final = frozenset({
    b"CAPABILITY", b"NOOP", b"LOGOUT", b"ID", b"SELECT", b"EXAMINE", b"CREATE", b"DELETE",
    b"RENAME", b"SUBSCRIBE", b"UNSUBSCRIBE", b"LIST", b"LSUB", b"XLIST", b"STATUS", b"APPEND",
    b"NAMESPACE", b"CHECK", b"CLOSE", b"UNSELECT", b"EXPUNGE", b"SEARCH", b"FETCH", b"STORE",
    b"COPY", b"MOVE", b"IDLE", b"SORT", b"THREAD", b"GETQUOTA", b"GETQUOTAROOT", b"GETACL",
    b"MYRIGHTS", b"LISTRIGHTS", b"GETMETADATA", b"UID SEARCH", b"UID FETCH", b"UID STORE",
    b"UID COPY", b"UID MOVE", b"UID EXPUNGE", b"UID SORT", b"UID THREAD",
})
#: Words in a command's arguments that enable an extension for the rest of the connection.
LASTING_WORDS: Final = (b"CONDSTORE", b"QRESYNC", b"MODSEQ", b"CHANGEDSINCE", b"UNCHANGEDSINCE")


class Phase(enum.Enum):
    """Where the client is in its current command (the table in the module docstring)."""

    # Members are singletons compared by identity: hash them so too (Enum's own __hash__ is
    # Python code, and the table is looked up for every command line).
    __hash__ = object.__hash__

    COMMAND = "command"
    LINE = "line"
    LITERAL = "literal"
    SYNC_LITERAL = "sync literal"
    OUR_LITERAL = "our literal"
    SKIP_LITERAL = "skip literal"
    SKIP_LINE = "skip line"
    IDLE = "idle"


class Event(enum.Enum):
    """What moves the phase: the client's lines and literals, the relay's refusal, the upstream."""

    __hash__ = object.__hash__

    LINE = "line"  # a line with no literal at its end (while idling: any line but DONE)
    SYNC_LITERAL = "{n}"  # a line announcing a synchronizing literal
    NONSYNC_LITERAL = "{n+}"  # ... a non-synchronizing literal the upstream takes as it is
    BIG_NONSYNC_LITERAL = "{n+} over the limit"  # ... one bigger than the upstream takes: sent {n}
    LITERAL_END = "literal end"  # the last octet of a literal
    IDLE = "IDLE"  # the first line "tag IDLE"
    DONE = "DONE"  # the line DONE while idling
    REFUSED = "refused"  # mailgate answers the command whose first line came just before
    CONTINUATION = "+"  # the upstream sent a continuation request
    TAGGED = "tagged"  # the upstream sent the tagged response to the command in progress


_P, _E = Phase, Event
#: Every transition of the command in progress: ``TRANSITIONS[phase][event]`` is the next phase.
TRANSITIONS: Final[Mapping[Phase, Mapping[Event, Phase]]] = {
    _P.COMMAND: {
        _E.LINE: _P.COMMAND,
        _E.SYNC_LITERAL: _P.SYNC_LITERAL,
        _E.NONSYNC_LITERAL: _P.LITERAL,
        _E.BIG_NONSYNC_LITERAL: _P.OUR_LITERAL,
        _E.IDLE: _P.IDLE,
        _E.REFUSED: _P.COMMAND,
    },
    _P.LINE: {
        _E.LINE: _P.COMMAND,
        _E.SYNC_LITERAL: _P.SYNC_LITERAL,
        _E.NONSYNC_LITERAL: _P.LITERAL,
        _E.BIG_NONSYNC_LITERAL: _P.OUR_LITERAL,
    },
    _P.LITERAL: {
        _E.LITERAL_END: _P.LINE,
        _E.REFUSED: _P.SKIP_LITERAL,  # the octets are on their way: drop them
    },
    _P.SYNC_LITERAL: {
        _E.CONTINUATION: _P.LITERAL,
        _E.TAGGED: _P.COMMAND,  # refused upstream: the client will not send the literal
        _E.LITERAL_END: _P.LINE,  # a client that did not wait for "+"
        _E.REFUSED: _P.COMMAND,  # the client waits for a "+" it will not get
    },
    _P.OUR_LITERAL: {
        _E.CONTINUATION: _P.LITERAL,  # (swallowed: the client never asked for it)
        _E.TAGGED: _P.SKIP_LITERAL,  # refused upstream: the client sends its {n+} octets anyway
        _E.REFUSED: _P.SKIP_LITERAL,
    },
    _P.SKIP_LITERAL: {
        _E.LITERAL_END: _P.SKIP_LINE,
    },
    _P.SKIP_LINE: {
        _E.LINE: _P.COMMAND,
        _E.SYNC_LITERAL: _P.COMMAND,  # the client waits for a "+" it will not get
        _E.NONSYNC_LITERAL: _P.SKIP_LITERAL,
        _E.BIG_NONSYNC_LITERAL: _P.SKIP_LITERAL,
    },
    _P.IDLE: {
        _E.LINE: _P.IDLE,
        _E.DONE: _P.COMMAND,  # the IDLE stays in flight until its tagged response
        _E.TAGGED: _P.COMMAND,  # refused upstream, or ended by it
    },
}
del _P, _E

#: Phases where the client's next bytes are literal octets.
LITERAL_PHASES: Final = frozenset(
    {Phase.LITERAL, Phase.SYNC_LITERAL, Phase.OUR_LITERAL, Phase.SKIP_LITERAL}
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A command mailgate answers itself: ``answer`` goes to the client now if ``due``, else
    it comes out of :meth:`RelayState.tagged` after the responses it must follow."""

    answer: bytes
    due: bool


class _Kind(enum.Enum):
    COMMAND = "command"  # any command sent upstream not listed below
    IDLE = "IDLE"
    SELECT = "SELECT"  # SELECT or EXAMINE
    DESELECT = "CLOSE"  # CLOSE or UNSELECT
    ANSWER = "answer"  # mailgate's own answer, waiting for its turn


_KIND_OF: Final = {
    b"IDLE": _Kind.IDLE,
    b"SELECT": _Kind.SELECT,
    b"EXAMINE": _Kind.SELECT,
    b"CLOSE": _Kind.DESELECT,
    b"UNSELECT": _Kind.DESELECT,
}


@dataclass(slots=True)
class _InFlight:
    tag: bytes
    kind: _Kind
    answer: bytes = b""


class RelayState:
    """The state of one relayed session (see the module docstring)."""

    def __init__(self) -> None:
        self.phase = Phase.COMMAND
        #: Tag of the command in progress (after it ended: of the last one).
        self.tag = b""
        self._in_flight: deque[_InFlight] = deque()
        self._owed = 0  # commands in flight that the upstream answers promptly (not IDLE)
        #: A mailbox is selected upstream (as far as the tagged responses relayed tell).
        self.selected = False
        self.logout_sent = False
        self.bye_seen = False
        #: Something lasts on the connection beyond this session (rule 4); never reset.
        self.tainted = False

    def _fire(self, event: Event) -> None:
        try:
            self.phase = TRANSITIONS[self.phase][event]
        except KeyError:
            raise RuntimeError(f"{event.name} cannot happen in phase {self.phase.name}") from None

    # -- the client (reported by CommandRelay)

    def command(self, tag: bytes, name: bytes, event: Event) -> Refusal | None:
        """The first line of a command; ``event`` is its :attr:`Event.LINE` or literal kind.

        Returns ``None`` when the command goes upstream, or mailgate's answer (rule 3).
        """
        if name == b"IDLE" and event is Event.LINE:
            event = Event.IDLE
        if self.phase is not Phase.COMMAND:
            raise RuntimeError(f"a command cannot start in phase {self.phase.name}")
        self.tag = tag
        self._fire(event)
        reason = REFUSED.get(name)
        if reason is not None:
            self._fire(Event.REFUSED)
            answer = tag + b" BAD " + reason + b"\r\n"
            if not self._in_flight:
                return Refusal(answer, due=True)
            self._in_flight.append(_InFlight(tag, _Kind.ANSWER, answer))
            return Refusal(answer, due=False)
        if name not in RESTING_COMMANDS:
            self.tainted = True
        kind = _KIND_OF.get(name, _Kind.COMMAND)
        self._in_flight.append(_InFlight(tag, kind))
        if kind is not _Kind.IDLE:
            self._owed += 1
        if name == b"LOGOUT":
            self.logout_sent = True
        return None

    def arguments(self, arguments: bytes) -> None:
        """The rest of the first line of the command just started (after its name)."""
        upper = arguments.upper()
        if any(word in upper for word in LASTING_WORDS):
            self.tainted = True

    def client_event(self, event: Event) -> None:
        """A line after the first one of a command, the end of a literal, DONE."""
        self._fire(event)

    # -- the upstream (reported by the driver)

    def continuation(self) -> bool:
        """The upstream sent ``+``; returns whether to relay it (False: it answers mailgate's
        own ``{n}``, which the client never asked for)."""
        ours = self.phase is Phase.OUR_LITERAL
        self.phase = TRANSITIONS[self.phase].get(Event.CONTINUATION, self.phase)
        return not ours

    def tagged(self, tag: bytes, status: bytes) -> bytes:
        """The upstream sent a tagged response (``status`` upper case: OK, NO, BAD).

        Returns mailgate's own answers now due (rule 3), to write right after that response.
        """
        if tag == self.tag:
            self.phase = TRANSITIONS[self.phase].get(Event.TAGGED, self.phase)
        entry = self._take(tag)
        if entry is not None:
            if entry.kind is not _Kind.IDLE:
                self._owed -= 1
            if status == b"OK":
                if entry.kind is _Kind.SELECT:
                    self.selected = True
                elif entry.kind is _Kind.DESELECT:
                    self.selected = False
            elif status == b"NO" and entry.kind is _Kind.SELECT:
                self.selected = False  # a failed SELECT leaves no mailbox selected (RFC 3501)
        due = b""
        queue = self._in_flight
        while queue and queue[0].kind is _Kind.ANSWER:
            due += queue.popleft().answer
        return due

    def _take(self, tag: bytes) -> _InFlight | None:
        """Remove and return the first command in flight with ``tag`` (mailgate's own answers
        are not the upstream's to end)."""
        queue = self._in_flight
        if queue and queue[0].tag == tag and queue[0].kind is not _Kind.ANSWER:
            return queue.popleft()  # the usual case: answers come in command order
        for entry in queue:
            if entry.tag == tag and entry.kind is not _Kind.ANSWER:
                queue.remove(entry)
                return entry
        return None

    def bye(self) -> None:
        """The upstream sent ``* BYE``."""
        self.bye_seen = True

    # -- questions

    @property
    def in_command(self) -> bool:
        """A command is half received from the client (literals included)."""
        return self.phase is not Phase.COMMAND

    @property
    def idling(self) -> bool:
        """IDLE runs (DONE not yet received from the client)."""
        return self.phase is Phase.IDLE

    @property
    def awaiting_continuation(self) -> bool:
        """Mailgate holds the client's literal until the upstream's ``+`` (or tagged NO)."""
        return self.phase is Phase.OUR_LITERAL

    @property
    def upstream_owes(self) -> bool:
        """A command sent upstream awaits its tagged response (IDLE excepted: silence is its
        purpose); the upstream must then not stall."""
        return self._owed > 0

    @property
    def in_flight(self) -> int:
        """Commands sent upstream (IDLE included) and answers of mailgate's own, not yet done."""
        return len(self._in_flight)

    @property
    def clean(self) -> bool:
        """The upstream connection is back at rest in the authenticated state: no command half
        sent or unanswered, no IDLE, no mailbox selected, neither LOGOUT sent nor BYE seen."""
        return not (
            self.in_command or self._in_flight or self.selected or self.logout_sent or self.bye_seen
        )

    @property
    def hand_back_ok(self) -> bool:
        """The client's LOGOUT just received is the only command in flight, and the session
        left nothing on the connection but perhaps a selected mailbox (rule 4)."""
        queue = self._in_flight
        return (
            self.logout_sent and not self.tainted and not self.bye_seen
            and self.phase is Phase.COMMAND and len(queue) == 1 and queue[0].tag == self.tag
        )

    def describe(self) -> str:
        """What is not at rest, for the session log (``clean`` when nothing)."""
        parts = []
        if self.idling:
            parts.append("IDLE running")
        elif self.in_command:
            parts.append("command half sent")
        if self._in_flight:
            parts.append(f"{len(self._in_flight)} command(s) unanswered")
        if self.selected:
            parts.append("mailbox selected")
        if self.bye_seen:
            parts.append("BYE seen")
        elif self.logout_sent:
            parts.append("LOGOUT sent")
        return ", ".join(parts) or "clean"

    def upstream_farewell(self) -> bytes | None:
        """What ends the upstream session politely after the client left: LOGOUT, after DONE if
        IDLE runs; ``None`` if a command is half sent (closing is then the only clean end: the
        half-sent command must never be completed)."""
        if self.idling:
            return b"DONE\r\n" + LOGOUT_COMMAND
        if self.in_command:
            return None
        return LOGOUT_COMMAND
