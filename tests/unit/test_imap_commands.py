"""Byte-for-byte and property tests of the sans-IO IMAP command framers and answer builders."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.imap_commands import (
    NEED_DATA,
    Atom,
    AwaitContinuation,
    BadCommand,
    Command,
    CommandLine,
    CommandReader,
    CommandRelay,
    ContinuationLine,
    Forward,
    LiteralContinue,
    ProtocolError,
    Reply,
    astring,
    bye,
    capability_response,
    continuation,
    greeting,
    id_response,
    is_nil,
    parse_arguments,
    prelogin_capabilities,
    quote,
    rewrite_nonsync_literal,
    tagged,
)
from gateway.protocol.imap_relay_state import REFUSED
from tests.fixtures.splits import split_at


def reader(**kw: int) -> CommandReader:
    return CommandReader(max_line=kw.get("max_line", 8192), max_literal=kw.get("max_literal", 8192))


def events(framer: CommandReader | CommandRelay, data: bytes = b"") -> list:
    framer.receive_data(data)
    out = []
    while (ev := framer.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def one(data: bytes):
    evs = events(reader(), data)
    assert len(evs) == 1, evs
    return evs[0]


# --------------------------------------------------------------------------- pre-login parsing


def test_login_with_atoms() -> None:
    cmd = one(b"a1 LOGIN alice s3cret\r\n")
    assert cmd == Command(tag=b"a1", name=b"LOGIN", args=(b"alice", b"s3cret"))
    assert isinstance(cmd.args[0], Atom)


def test_command_name_is_upper_cased_and_bare_lf_accepted() -> None:
    assert one(b"x capability\n") == Command(tag=b"x", name=b"CAPABILITY", args=())


def test_quoted_strings_with_escapes() -> None:
    cmd = one(b'a LOGIN "al ice" "p\\"w\\\\d"\r\n')
    assert cmd.args == (b"al ice", b'p"w\\d')
    assert not isinstance(cmd.args[0], Atom)


def test_quoted_string_may_carry_utf8() -> None:
    assert one('a LOGIN "jösé" "pässwörd"\r\n'.encode()).args == ("jösé".encode(), "pässwörd".encode())


def test_synchronizing_literals_ask_for_continuation() -> None:
    r = reader()
    assert events(r, b"a LOGIN {5}\r\n") == [LiteralContinue(b"a")]
    assert events(r, b"alice {6}\r\n") == [LiteralContinue(b"a")]
    assert events(r, b"se cr") == []
    assert events(r, b"t\r\n") == [Command(tag=b"a", name=b"LOGIN", args=(b"alice", b"se crt"))]


def test_literal_octets_are_taken_verbatim() -> None:
    r = reader()
    evs = events(r, b"a LOGIN {5}\r\nalice {4}\r\n\r\n\"x\r\n")
    assert evs[:2] == [LiteralContinue(b"a"), LiteralContinue(b"a")]
    assert evs[2] == Command(tag=b"a", name=b"LOGIN", args=(b"alice", b'\r\n"x'))


def test_non_synchronizing_literals_need_no_continuation() -> None:
    assert events(reader(), b"a LOGIN {5+}\r\nalice {3+}\r\npwd\r\n") == [
        Command(tag=b"a", name=b"LOGIN", args=(b"alice", b"pwd"))
    ]


def test_parenthesised_lists_and_nil() -> None:
    cmd = one(b'i ID ("name" "mutt" "version" NIL)\r\n')
    assert cmd.name == b"ID"
    (fields,) = cmd.args
    assert fields == (b"name", b"mutt", b"version", b"NIL")
    assert is_nil(fields[3]) and not is_nil(fields[2])
    assert astring(fields[0]) == b"name" and astring(fields) is None
    assert one(b"i ID NIL\r\n").args == (b"NIL",)


def test_nested_lists_and_literal_inside_list() -> None:
    r = reader()
    evs = events(r, b"t ID ((a) {2}\r\nxy b)\r\n")
    assert evs == [LiteralContinue(b"t"), Command(tag=b"t", name=b"ID", args=(((b"a",), b"xy", b"b"),))]


def test_pipelined_commands() -> None:
    evs = events(reader(), b"a NOOP\r\nb CAPABILITY\r\nc LOGOUT\r\n")
    assert [e.name for e in evs] == [b"NOOP", b"CAPABILITY", b"LOGOUT"]


@pytest.mark.parametrize(
    ("data", "tag", "reason"),
    [
        (b"\r\n", None, "missing or invalid tag"),
        (b"a+ NOOP\r\n", None, "missing or invalid tag"),
        (b"abc\r\n", b"abc", "missing or invalid command name"),
        (b'a LOGIN "unterminated\r\n', b"a", "unterminated or badly escaped quoted string"),
        (b'a LOGIN "bad\\escape"\r\n', b"a", "unterminated or badly escaped quoted string"),
        (b"a ID (x\r\n", b"a", "unterminated list"),
        (b"a ID x)\r\n", b"a", "unexpected ')'"),
        (b'a LOGIN "x""y"\r\n', b"a", "missing space between arguments"),
        (b"a LOGIN x {y\r\n", b"a", "invalid character in command"),
        (b'a LOGIN "x\x00" y\r\n', b"a", "NUL in quoted string"),
    ],
)
def test_malformed_commands_give_bad_command(data: bytes, tag: bytes | None, reason: str) -> None:
    assert one(data) == BadCommand(tag, reason)


def test_bad_command_does_not_stop_the_reader() -> None:
    evs = events(reader(), b"(bad\r\na NOOP\r\n")
    assert evs == [BadCommand(None, "missing or invalid tag"), Command(b"a", b"NOOP", ())]


def test_oversized_sync_literal_is_refused_without_continuation() -> None:
    r = reader(max_literal=100)
    assert events(r, b"a LOGIN {101}\r\n") == [BadCommand(b"a", "literal is too large")]
    # The client did not get "+", so what it sends next is a new command.
    assert events(r, b"b NOOP\r\n") == [Command(b"b", b"NOOP", ())]


def test_oversized_nonsync_literal_is_fatal() -> None:
    with pytest.raises(ProtocolError):
        events(reader(max_literal=100), b"a LOGIN {101+}\r\n")


def test_nonsync_literal_of_a_bad_command_is_skipped() -> None:
    r = reader()
    evs = events(r, b"+bad {3+}\r\n)({ {2+}\r\nzz\r\nb NOOP\r\n")
    assert evs == [BadCommand(None, "missing or invalid tag"), Command(b"b", b"NOOP", ())]


def test_whole_command_size_is_bounded() -> None:
    r = CommandReader(max_line=1024, max_literal=1000, max_command=1500)
    assert events(r, b"a LOGIN {900}\r\n") == [LiteralContinue(b"a")]
    evs = events(r, b"x" * 900 + b" {900}\r\n")
    assert evs == [BadCommand(b"a", "literal is too large")]
    assert events(r, b"b NOOP\r\n") == [Command(b"b", b"NOOP", ())]


def test_line_length_limit_is_fatal() -> None:
    r = reader(max_line=512)
    with pytest.raises(ProtocolError):
        events(r, b"a LOGIN " + b"x" * 600)
    r = reader(max_line=512)
    with pytest.raises(ProtocolError):
        events(r, b"a LOGIN " + b"x" * 600 + b"\r\n")


def test_literal8_is_refused_before_login() -> None:
    assert one(b"a LOGIN ~{3}\r\n") == BadCommand(b"a", "literal8 is not allowed here")


def test_continuation_line_for_authenticate() -> None:
    r = reader()
    assert events(r, b"a AUTHENTICATE PLAIN\r\n") == [Command(b"a", b"AUTHENTICATE", (b"PLAIN",))]
    r.expect_continuation_line()
    assert events(r, b"AGFsaWNlAHB3\r\nb NOOP\r\n") == [ContinuationLine(b"AGFsaWNlAHB3"), Command(b"b", b"NOOP", ())]
    assert "AGF" not in repr(ContinuationLine(b"AGFsaWNlAHB3"))


def test_discard_buffer_drops_bytes_after_starttls() -> None:
    r = reader()
    r.receive_data(b"a STARTTLS\r\nb LOGIN injected pw\r\n")
    assert r.next_event() == Command(b"a", b"STARTTLS", ())
    r.discard_buffer()
    assert r.next_event() is NEED_DATA
    assert r.buffered == 0


def test_command_repr_hides_arguments() -> None:
    assert "s3cret" not in repr(one(b"a LOGIN alice s3cret\r\n"))


def test_parse_arguments() -> None:
    assert parse_arguments(b'"INBOX" (UIDNEXT)') == (b"INBOX", (b"UIDNEXT",))
    assert parse_arguments(b'"open') is None


# --------------------------------------------------------------------------- responses


def test_response_builders() -> None:
    caps = prelogin_capabilities(starttls=True, login_allowed=False)
    assert caps == ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID", "STARTTLS", "LOGINDISABLED"]
    caps = prelogin_capabilities(starttls=False, login_allowed=True)
    assert "AUTH=PLAIN" in caps and "LOGINDISABLED" not in caps and "STARTTLS" not in caps
    assert greeting(["IMAP4rev1", "ID"]) == b"* OK [CAPABILITY IMAP4rev1 ID] mailgate ready.\r\n"
    assert capability_response(["IMAP4rev1"]) == b"* CAPABILITY IMAP4rev1\r\n"
    assert tagged(b"a1", "NO", "Bad\r\n stuff", "AUTHENTICATIONFAILED") == (
        b"a1 NO [AUTHENTICATIONFAILED] Bad stuff\r\n"
    )
    assert tagged(None, "BAD", "what?") == b"* BAD what?\r\n"  # type: ignore[arg-type]
    assert bye("Logging out") == b"* BYE Logging out\r\n"
    assert continuation() == b"+ \r\n"
    assert continuation(b"VXNlcm5hbWU6") == b"+ VXNlcm5hbWU6\r\n"
    assert quote('a"b\\c') == b'"a\\"b\\\\c"'
    assert id_response({"name": "mailgate"}) == b'* ID ("name" "mailgate")\r\n'
    assert id_response({}) == b"* ID NIL\r\n"


def test_rewrite_nonsync_literal() -> None:
    assert rewrite_nonsync_literal(b"a APPEND X {5000+}\r\n") == (b"a APPEND X {5000}\r\n", True)
    assert rewrite_nonsync_literal(b"a APPEND X {4096+}\r\n") == (b"a APPEND X {4096+}\r\n", False)
    assert rewrite_nonsync_literal(b"a APPEND X ~{5000+}\n") == (b"a APPEND X ~{5000}\n", True)
    assert rewrite_nonsync_literal(b"a APPEND X {5000+}\r\n", None)[1] is False
    assert rewrite_nonsync_literal(b"a APPEND X {1+}\r\n", 0) == (b"a APPEND X {1}\r\n", True)
    assert rewrite_nonsync_literal(b"a APPEND X {5000}\r\n")[1] is False


# --------------------------------------------------------------------------- relay


def relay(limit: int | None = 4096, **kw: int) -> CommandRelay:
    return CommandRelay(
        max_line=kw.get("max_line", 65536), max_literal=kw.get("max_literal", 10**8), nonsync_literal_limit=limit
    )


def forwarded(evs: list) -> bytes:
    return b"".join(e.data for e in evs if isinstance(e, (CommandLine, Forward)))


def test_relay_simple_commands() -> None:
    r = relay()
    evs = events(r, b"a SELECT INBOX\r\nb UID fetch 1:* (FLAGS)\r\n")
    assert [(e.tag, e.name, e.arguments, e.literal) for e in evs] == [
        (b"a", b"SELECT", b"INBOX", None),
        (b"b", b"UID FETCH", b"1:* (FLAGS)", None),
    ]
    assert forwarded(evs) == b"a SELECT INBOX\r\nb UID fetch 1:* (FLAGS)\r\n"


def test_relay_streams_literal_octets() -> None:
    r = relay()
    evs = events(r, b"a APPEND INBOX {10}\r\n")
    assert evs == [CommandLine(b"a", b"APPEND", b"INBOX ", b"a APPEND INBOX {10}\r\n", 10)]
    assert r.state.continuation() is True  # the client asked for this "+": relay it
    assert events(r, b"0123") == [Forward(b"0123")]
    assert events(r, b"456789\r\nb NOOP\r\n") == [
        Forward(b"456789"),
        Forward(b"\r\n"),
        CommandLine(b"b", b"NOOP", b"", b"b NOOP\r\n", None),
    ]


def test_relay_rewrites_large_nonsync_literal_and_waits() -> None:
    r = relay(4096)
    evs = events(r, b"a APPEND INBOX {5000+}\r\n" + b"x" * 100)
    assert evs == [CommandLine(b"a", b"APPEND", b"INBOX ", b"a APPEND INBOX {5000}\r\n", 5000), AwaitContinuation(b"a")]
    assert r.state.awaiting_continuation
    assert r.state.continuation() is False  # mailgate's own: swallow it
    assert not r.state.awaiting_continuation
    assert forwarded(events(r, b"x" * 4900 + b"\r\n")) == b"x" * 5000 + b"\r\n"


def test_relay_keeps_small_nonsync_literal() -> None:
    r = relay(4096)
    evs = events(r, b"a APPEND INBOX {5+}\r\nhello\r\n")
    assert forwarded(evs) == b"a APPEND INBOX {5+}\r\nhello\r\n"
    assert not any(isinstance(e, AwaitContinuation) for e in evs)
    r = relay(None)  # LITERAL+ upstream: never rewritten
    evs = events(r, b"a APPEND INBOX {5000+}\r\n" + b"y" * 5000 + b"\r\n")
    assert forwarded(evs) == b"a APPEND INBOX {5000+}\r\n" + b"y" * 5000 + b"\r\n"


def test_relay_discards_rewritten_literal_refused_by_upstream() -> None:
    r = relay(4096)
    events(r, b"a APPEND INBOX {5000+}\r\n")
    assert r.state.tagged(b"a", b"NO") == b""  # "a NO [TOOBIG]" instead of "+"
    evs = events(r, b"z" * 5000 + b" {3+}\r\nabc\r\nb NOOP\r\n")
    assert evs == [CommandLine(b"b", b"NOOP", b"", b"b NOOP\r\n", None)]


def test_relay_sync_literal_refused_by_upstream() -> None:
    r = relay()
    events(r, b"a APPEND INBOX {10}\r\n")
    assert r.state.tagged(b"a", b"NO") == b""  # the client will not send the literal
    assert events(r, b"b NOOP\r\n") == [CommandLine(b"b", b"NOOP", b"", b"b NOOP\r\n", None)]


def test_relay_idle_done() -> None:
    r = relay()
    evs = events(r, b"i IDLE\r\n")
    assert evs[0].name == b"IDLE" and r.state.idling and r.state.tag == b"i"
    assert r.state.continuation() is True
    assert events(r, b"done\r\n") == [Forward(b"done\r\n")]
    assert not r.state.idling
    r.state.tagged(b"i", b"OK")
    assert events(r, b"n NOOP\r\n")[0].name == b"NOOP"


def test_relay_idle_refused_by_upstream() -> None:
    r = relay()
    events(r, b"i IDLE\r\n")
    r.state.tagged(b"i", b"NO")  # "i NO" instead of "+ idling"
    assert not r.state.idling
    assert events(r, b"j NOOP\r\n")[0].name == b"NOOP"


def test_relay_refuse_command_skips_nonsync_literal() -> None:
    r = relay()
    assert events(r, b"a LOGIN {3+}\r\n") == [Reply(b"a BAD Already logged in.\r\n")]
    assert events(r, b"bob {2+}\r\npw\r\nb NOOP\r\n") == [CommandLine(b"b", b"NOOP", b"", b"b NOOP\r\n", None)]


def test_relay_refuse_command_with_sync_literal() -> None:
    r = relay()
    assert events(r, b"a LOGIN {3}\r\n") == [Reply(b"a BAD Already logged in.\r\n")]
    assert events(r, b"b NOOP\r\n")[0].name == b"NOOP"


def test_relay_refuse_rewritten_literal_drops_await() -> None:
    r = relay(4096)
    assert events(r, b"a COMPRESS {5000+}\r\n") == [Reply(b"a BAD COMPRESS is not supported by this server.\r\n")]
    assert events(r, b"q" * 5000 + b"\r\nb NOOP\r\n") == [CommandLine(b"b", b"NOOP", b"", b"b NOOP\r\n", None)]


def test_relay_refused_command_answer_waits_for_earlier_commands() -> None:
    r = relay()
    evs = events(r, b"i IDLE\r\nDONE\r\nx STARTTLS\r\nn NOOP\r\ny LOGIN {2+}\r\nab\r\n")
    assert forwarded(evs) == b"i IDLE\r\nDONE\r\nn NOOP\r\n"
    assert not any(isinstance(e, Reply) for e in evs)  # both wait: their BAD comes later
    assert r.state.continuation() is True  # "+ idling"
    assert r.state.tagged(b"i", b"OK") == b"x BAD STARTTLS is not available after login.\r\n"
    assert r.state.tagged(b"n", b"OK") == b"y BAD Already logged in.\r\n"
    assert events(r, b"z STARTTLS\r\n") == [Reply(b"z BAD STARTTLS is not available after login.\r\n")]


def test_relay_limits() -> None:
    with pytest.raises(ProtocolError):
        events(relay(max_literal=1000), b"a APPEND INBOX {1001}\r\n")
    with pytest.raises(ProtocolError):
        events(relay(max_line=1024), b"a " + b"x" * 1100)


def test_relay_empty_and_junk_lines_are_forwarded() -> None:
    evs = events(relay(), b"\r\nfoo\r\n")
    assert [(e.tag, e.name) for e in evs] == [(b"", b""), (b"foo", b"")]
    assert forwarded(evs) == b"\r\nfoo\r\n"


# --------------------------------------------------------------------------- properties

_ATOM_ALPHABET = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '(){"\\%*]+')
_atoms = st.text(_ATOM_ALPHABET, min_size=1, max_size=12).map(str.encode)
_strings = st.binary(max_size=40)


_SPECIAL_NAMES = frozenset({*REFUSED, b"IDLE", b"UID"})


@st.composite
def _commands(
    draw: st.DrawFn, nonsync_limit: int | None = None, relayed: bool = False
) -> tuple[bytes, Command, bytes]:
    """(wire bytes, the Command they mean, the bytes a relay forwards for ``nonsync_limit``).

    ``relayed``: no name the relay handles apart (answered by mailgate, IDLE, UID), whose bytes
    are not forwarded as they are.
    """
    tag = draw(_atoms)
    name = draw(_atoms.filter(lambda n: n.upper() not in _SPECIAL_NAMES) if relayed else _atoms)
    args = draw(st.lists(st.one_of(_atoms, _strings), max_size=4))
    parts = [tag + b" " + name]
    relayed = [parts[0]]
    expected: list[bytes] = []
    for arg in args:
        kind = draw(st.sampled_from(["literal+", "literal", "quoted", "atom"]))
        if kind == "atom" and arg and all(0x21 <= c < 0x7F and c not in b'(){"' for c in arg):
            parts.append(b" " + arg)
            relayed.append(parts[-1])
        elif kind == "quoted" and b"\r" not in arg and b"\n" not in arg and b"\x00" not in arg:
            parts.append(b' "' + arg.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"')
            relayed.append(parts[-1])
        else:
            plus = b"+" if kind == "literal+" else b""
            parts.append(b" {%d%s}\r\n" % (len(arg), plus) + arg)
            if plus and nonsync_limit is not None and len(arg) > nonsync_limit:
                plus = b""
            relayed.append(b" {%d%s}\r\n" % (len(arg), plus) + arg)
        expected.append(arg)
    cmd = Command(tag=tag, name=name.upper(), args=tuple(expected))
    return b"".join(parts) + b"\r\n", cmd, b"".join(relayed) + b"\r\n"


@settings(max_examples=200, deadline=None)
@given(st.lists(_commands(), min_size=1, max_size=4), st.lists(st.integers(min_value=0), max_size=12))
def test_reader_parses_any_split_identically(cmds: list, cuts: list[int]) -> None:
    stream = b"".join(c[0] for c in cmds)
    r = reader()
    got = []
    for piece in split_at(stream, cuts):
        got += [e for e in events(r, piece) if not isinstance(e, LiteralContinue)]
    assert got == [c[1] for c in cmds]


@st.composite
def _relay_case(draw: st.DrawFn) -> tuple[int | None, list]:
    limit = draw(st.sampled_from([None, 0, 5, 4096]))
    return limit, draw(st.lists(_commands(limit, relayed=True), min_size=1, max_size=4))


@settings(max_examples=200, deadline=None)
@given(_relay_case(), st.lists(st.integers(min_value=0), max_size=12))
def test_relay_forwards_any_split_identically(case: tuple, cuts: list[int]) -> None:
    limit, cmds = case
    stream = b"".join(c[0] for c in cmds)
    r = relay(limit)
    out = []
    for piece in split_at(stream, cuts):
        r.receive_data(piece)
        while (ev := r.next_event()) is not NEED_DATA:
            out.append(ev)
            if isinstance(ev, AwaitContinuation):  # the upstream answers "+" to the rewritten {n}
                assert r.state.continuation() is False
    assert forwarded(out) == b"".join(c[2] for c in cmds)
    assert [(e.tag, e.name) for e in out if isinstance(e, CommandLine)] == [(c[1].tag, c[1].name) for c in cmds]


def _until_sync_literal(command: bytes) -> bytes:
    """What a client sends of a command that gets BAD: up to its first ``{n}`` (it waits for a
    "+" that never comes), or all of it."""
    pos = 0
    while (end := command.find(b"\n", pos) + 1) > 0:
        m = re.search(rb"\{(\d+)(\+?)\}\r\n\Z", command[pos:end])
        if m and not m.group(2):
            return command[:end]
        pos = end + (int(m.group(1)) if m else 0)
    return command


@settings(max_examples=200, deadline=None)
@given(_relay_case(), st.lists(st.booleans(), min_size=4, max_size=4), st.sampled_from(sorted(REFUSED)),
       st.lists(st.integers(min_value=0), max_size=12))
def test_relay_drops_refused_commands_whole(case: tuple, refuse: list[bool], name: bytes, cuts: list[int]) -> None:
    """A refused command (literals of any kind included) is never forwarded, in any split, and
    gets exactly one BAD, in command order."""
    limit, cmds = case
    wire, kept = [], []
    for i, (data, cmd, relayed) in enumerate(cmds):
        if refuse[i]:
            data = _until_sync_literal(cmd.tag + b" " + name + data[len(cmd.tag) + 1 + len(cmd.name) :])
        else:
            kept.append(relayed)
        wire.append(data)
    r = relay(limit)
    out = []
    for piece in split_at(b"".join(wire), cuts):
        r.receive_data(piece)
        while (ev := r.next_event()) is not NEED_DATA:
            out.append(ev)
            if isinstance(ev, AwaitContinuation):
                assert r.state.continuation() is False
    bad = b"".join(e.data for e in out if isinstance(e, Reply))  # due at once: nothing before
    for ev in out:  # the upstream answers after the whole input, in order
        if isinstance(ev, CommandLine):
            bad += r.state.tagged(ev.tag, b"OK")
    assert forwarded(out) == b"".join(kept)
    refused_tags = [c[1].tag for i, c in enumerate(cmds) if refuse[i]]
    assert [line.split(b" ")[:2] for line in bad.splitlines()] == [[t, b"BAD"] for t in refused_tags]
    assert r.state.in_flight == 0 and not r.state.in_command


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0), max_size=6))
def test_reader_random_bytes_only_raise_protocol_error(data: bytes, cuts: list[int]) -> None:
    r = CommandReader(max_line=512, max_literal=512)
    try:
        for piece in split_at(data, cuts):
            events(r, piece)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=600),
    st.lists(st.integers(min_value=0), max_size=6),
    st.lists(st.sampled_from(["plus", "tagged"]), max_size=4),
)
def test_relay_random_bytes_only_raise_protocol_error(data: bytes, cuts: list[int], reports: list[str]) -> None:
    r = CommandRelay(max_line=512, max_literal=1000, nonsync_literal_limit=10)
    try:
        for piece in split_at(data, cuts):
            r.receive_data(piece)
            while (ev := r.next_event()) is not NEED_DATA:
                action = reports.pop() if reports else None
                if action == "plus":
                    r.state.continuation()
                elif action == "tagged" and isinstance(ev, CommandLine):
                    r.state.tagged(ev.tag, b"NO")
    except ProtocolError:
        pass
