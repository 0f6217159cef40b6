"""Event-level and property tests of the relay's state machine (gateway.protocol.imap_relay_state)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.imap_relay_state import (
    LITERAL_PHASES,
    LOGOUT_COMMAND,
    REFUSED,
    TRANSITIONS,
    Event,
    Phase,
    Refusal,
    RelayState,
)

CLIENT_EVENTS = [e for e in Event if e not in (Event.CONTINUATION, Event.TAGGED)]


# --------------------------------------------------------------------------- the table


def test_every_phase_has_a_row_and_is_reachable() -> None:
    assert set(TRANSITIONS) == set(Phase)
    seen, todo = {Phase.COMMAND}, [Phase.COMMAND]
    while todo:
        for nxt in TRANSITIONS[todo.pop()].values():
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(Phase)


def test_literal_phases_end_with_literal_end_or_the_upstream() -> None:
    for phase in LITERAL_PHASES:
        row = TRANSITIONS[phase]
        assert Event.LITERAL_END in row or Event.CONTINUATION in row, phase


def test_a_client_event_outside_the_table_is_a_bug() -> None:
    s = RelayState()
    with pytest.raises(RuntimeError):
        s.client_event(Event.DONE)  # DONE outside IDLE: the framer never reports it
    assert s.phase is Phase.COMMAND


def test_upstream_events_outside_the_table_change_nothing() -> None:
    s = RelayState()
    s.command(b"a", b"APPEND", Event.NONSYNC_LITERAL)
    assert s.phase is Phase.LITERAL
    assert s.continuation() is True  # relayed, phase unchanged
    assert s.tagged(b"a", b"NO") == b""
    assert s.phase is Phase.LITERAL


# --------------------------------------------------------------------------- literals and IDLE


def test_sync_literal_continued_or_refused_by_the_upstream() -> None:
    s = RelayState()
    assert s.command(b"a", b"APPEND", Event.SYNC_LITERAL) is None
    assert s.phase is Phase.SYNC_LITERAL and s.in_command and not s.awaiting_continuation
    assert s.continuation() is True  # the client asked for it
    assert s.phase is Phase.LITERAL
    s.client_event(Event.LITERAL_END)
    s.client_event(Event.LINE)
    assert s.phase is Phase.COMMAND
    s.command(b"b", b"APPEND", Event.SYNC_LITERAL)
    s.tagged(b"b", b"NO")  # instead of "+": the client will not send the literal
    assert s.phase is Phase.COMMAND and s.in_flight == 1


def test_rewritten_literal_waits_for_our_continuation_or_is_skipped() -> None:
    s = RelayState()
    s.command(b"a", b"APPEND", Event.BIG_NONSYNC_LITERAL)
    assert s.awaiting_continuation
    assert s.continuation() is False  # mailgate's own: swallowed
    assert s.phase is Phase.LITERAL
    s.client_event(Event.LITERAL_END)
    s.client_event(Event.LINE)
    s.command(b"b", b"APPEND", Event.BIG_NONSYNC_LITERAL)
    s.tagged(b"b", b"NO")  # [TOOBIG]: the client's octets come anyway
    assert s.phase is Phase.SKIP_LITERAL
    s.client_event(Event.LITERAL_END)
    s.client_event(Event.NONSYNC_LITERAL)  # a further literal of the same command
    assert s.phase is Phase.SKIP_LITERAL
    s.client_event(Event.LITERAL_END)
    s.client_event(Event.LINE)
    assert s.phase is Phase.COMMAND


def test_idle_done_and_idle_ended_by_the_upstream() -> None:
    s = RelayState()
    s.command(b"i", b"IDLE", Event.LINE)
    assert s.idling and not s.upstream_owes and s.in_flight == 1
    assert s.continuation() is True
    s.client_event(Event.LINE)  # anything but DONE stays in IDLE
    s.client_event(Event.DONE)
    assert s.phase is Phase.COMMAND and s.in_flight == 1  # the IDLE's OK is still to come
    s.tagged(b"i", b"OK")
    assert s.in_flight == 0
    s.command(b"j", b"IDLE", Event.LINE)
    s.tagged(b"j", b"BAD")  # refused: no DONE will come
    assert not s.idling
    s.command(b"k", b"IDLE", Event.SYNC_LITERAL)  # IDLE with a literal is not IDLE
    assert s.phase is Phase.SYNC_LITERAL


def test_tagged_answer_of_an_earlier_command_does_not_end_the_current_one() -> None:
    s = RelayState()
    s.command(b"i", b"IDLE", Event.LINE)
    s.client_event(Event.DONE)
    s.command(b"a", b"APPEND", Event.SYNC_LITERAL)
    s.tagged(b"i", b"OK")
    assert s.phase is Phase.SYNC_LITERAL and s.tag == b"a"


# --------------------------------------------------------------------------- refusals and order


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_commands(name: bytes) -> None:
    s = RelayState()
    got = s.command(b"t", name, Event.LINE)
    assert got == Refusal(b"t BAD " + REFUSED[name] + b"\r\n", due=True)
    assert s.clean


@pytest.mark.parametrize(
    ("event", "phase"),
    [
        (Event.LINE, Phase.COMMAND),
        (Event.SYNC_LITERAL, Phase.COMMAND),  # the client waits for "+", gets BAD
        (Event.NONSYNC_LITERAL, Phase.SKIP_LITERAL),
        (Event.BIG_NONSYNC_LITERAL, Phase.SKIP_LITERAL),
    ],
)
def test_refused_command_drops_the_rest(event: Event, phase: Phase) -> None:
    s = RelayState()
    assert s.command(b"t", b"LOGIN", event) is not None
    assert s.phase is phase and not s.awaiting_continuation


def test_refusal_waits_for_every_earlier_command_even_answered_out_of_order() -> None:
    s = RelayState()
    s.command(b"a", b"FETCH", Event.LINE)
    s.command(b"b", b"STORE", Event.LINE)
    refusal = s.command(b"x", b"STARTTLS", Event.LINE)
    assert refusal is not None and not refusal.due
    assert s.tagged(b"b", b"OK") == b""  # "a" is still unanswered
    assert s.tagged(b"a", b"OK") == b"x BAD STARTTLS is not available after login.\r\n"
    assert s.in_flight == 0


def test_unknown_and_duplicate_tags() -> None:
    s = RelayState()
    s.command(b"a", b"NOOP", Event.LINE)
    s.command(b"a", b"NOOP", Event.LINE)
    assert s.tagged(b"zz", b"OK") == b"" and s.in_flight == 2
    s.tagged(b"a", b"OK")
    assert s.upstream_owes
    s.tagged(b"a", b"OK")
    assert not s.upstream_owes and s.in_flight == 0


# --------------------------------------------------------------------------- session facts


def test_selected_mailbox() -> None:
    s = RelayState()
    s.command(b"s", b"SELECT", Event.LINE)
    assert not s.selected  # not before the OK
    s.tagged(b"s", b"OK")
    assert s.selected and not s.clean
    s.command(b"t", b"SELECT", Event.LINE)
    s.tagged(b"t", b"BAD")  # not executed: nothing changes
    assert s.selected
    s.command(b"u", b"EXAMINE", Event.SYNC_LITERAL)  # the mailbox name as a literal
    s.continuation()
    s.client_event(Event.LITERAL_END)
    s.client_event(Event.LINE)
    s.tagged(b"u", b"NO")  # a failed SELECT leaves no mailbox selected
    assert not s.selected
    s.command(b"v", b"EXAMINE", Event.LINE)
    s.tagged(b"v", b"OK")
    s.command(b"c", b"CLOSE", Event.LINE)
    s.tagged(b"c", b"NO")
    assert s.selected
    s.command(b"d", b"UNSELECT", Event.LINE)
    s.tagged(b"d", b"OK")
    assert not s.selected and s.clean


def test_clean_logout_bye_and_farewell() -> None:
    s = RelayState()
    assert s.clean and s.describe() == "clean" and s.upstream_farewell() == LOGOUT_COMMAND
    s.command(b"i", b"IDLE", Event.LINE)
    assert not s.clean and s.upstream_farewell() == b"DONE\r\n" + LOGOUT_COMMAND
    assert s.describe() == "IDLE running, 1 command(s) unanswered"
    s.client_event(Event.DONE)
    s.tagged(b"i", b"OK")
    s.command(b"a", b"APPEND", Event.NONSYNC_LITERAL)
    assert s.upstream_farewell() is None  # half sent: close, never complete it
    s.client_event(Event.LITERAL_END)
    s.client_event(Event.LINE)
    s.tagged(b"a", b"OK")
    assert s.clean
    s.command(b"l", b"LOGOUT", Event.LINE)
    assert s.logout_sent and s.upstream_owes
    s.bye()
    s.tagged(b"l", b"OK")
    assert s.bye_seen and not s.clean and s.describe() == "BYE seen"


# --------------------------------------------------------------------------- properties

_NAMES = [b"NOOP", b"FETCH", b"SELECT", b"CLOSE", b"IDLE", b"LOGOUT", *REFUSED]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_NAMES), st.integers(0, 3)), min_size=1, max_size=12),
       st.randoms(use_true_random=False))
def test_answers_reach_the_client_in_command_order(script: list, rnd: random.Random) -> None:
    """Whatever commands the client pipelines and whenever the upstream answers them (in order,
    as IMAP servers do), every tagged answer the client gets — relayed or mailgate's own —
    comes in command order, and once all are answered nothing is left in flight."""
    s = RelayState()
    sent: list[bytes] = []  # upstream commands not yet answered, in order
    client_got: list[bytes] = []
    tags = []
    for i, (name, answers_now) in enumerate(script):
        tag = b"t%d" % i
        tags.append(tag)
        refusal = s.command(tag, name, Event.LINE)
        if name == b"IDLE":
            s.client_event(Event.DONE)
        if refusal is None:
            sent.append(tag)
        elif refusal.due:
            client_got.append(tag)
        for _ in range(min(answers_now, len(sent))):
            tag_done = sent.pop(0)
            client_got.append(tag_done)
            due = s.tagged(tag_done, rnd.choice([b"OK", b"NO", b"BAD"]))
            client_got += [line.split(b" ", 1)[0] for line in due.splitlines()]
    while sent:
        tag_done = sent.pop(0)
        client_got.append(tag_done)
        client_got += [line.split(b" ", 1)[0] for line in s.tagged(tag_done, b"OK").splitlines()]
    assert client_got == tags
    assert s.in_flight == 0 and not s.upstream_owes and not s.in_command


def _logout_after(*commands: tuple[bytes, bytes]) -> RelayState:
    """A state after ``commands`` (name, arguments), each answered OK, then a LOGOUT."""
    state = RelayState()
    for n, (name, arguments) in enumerate(commands):
        tag = b"t%d" % n
        assert state.command(tag, name, Event.LINE) is None
        state.arguments(arguments)
        state.tagged(tag, b"OK")
    state.command(b"z", b"LOGOUT", Event.LINE)
    return state


def test_a_logout_may_be_answered_locally_only_after_resting_commands() -> None:
    assert _logout_after().hand_back_ok
    selected = _logout_after((b"SELECT", b"INBOX"), (b"UID FETCH", b"1:* (FLAGS)"))
    assert selected.hand_back_ok and selected.selected  # the pool leaves it with UNSELECT
    for name, arguments in ((b"ENABLE", b"CONDSTORE"), (b"NOTIFY", b"SET (SELECTED MessageNew)"),
                            (b"SELECT", b"INBOX (CONDSTORE)"), (b"UID FETCH", b"1:* (FLAGS) (CHANGEDSINCE 5)"),
                            (b"SEARCH", b"MODSEQ 7"), (b"X-UNKNOWN", b"")):
        state = _logout_after((name, arguments))
        assert state.tainted and not state.hand_back_ok, name


def test_a_logout_behind_an_unanswered_command_or_after_bye_is_relayed() -> None:
    state = RelayState()
    state.command(b"a", b"NOOP", Event.LINE)
    state.command(b"z", b"LOGOUT", Event.LINE)
    assert not state.hand_back_ok  # the NOOP is still in flight
    state = _logout_after()
    state.bye()
    assert not state.hand_back_ok
    state = RelayState()
    state.command(b"a", b"IDLE", Event.LINE)
    state.client_event(Event.DONE)
    state.tagged(b"a", b"OK")
    state.command(b"z", b"LOGOUT", Event.LINE)
    assert state.hand_back_ok  # a finished IDLE leaves nothing
