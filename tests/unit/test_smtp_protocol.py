"""The sans-IO SMTP core (gateway.protocol.smtp): command parsing against the state table,
the DATA end-of-message scanner, BDAT framing, reply building and reply parsing."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol import smtp
from gateway.protocol.smtp import (
    CommandReader,
    CommandRejected,
    DataScanner,
    Extensions,
    Reply,
    ReplyParser,
    SessionState,
    State,
    parse_command,
)
from tests.fixtures.splits import split_at

EXT = Extensions(size=True, eightbitmime=True, smtputf8=True, chunking=True)


def session(state: State = State.READY) -> SessionState:
    s = SessionState()
    if state is not State.INITIAL:
        s.greeted(esmtp=True)
    if state in (State.MAIL, State.RCPT, State.CHUNKING):
        s.mail_accepted()
    if state in (State.RCPT, State.CHUNKING):
        s.rcpt_accepted()
    if state is State.CHUNKING:
        s.chunk_accepted(last=False)
    return s


def rejected(line: bytes, state: State = State.READY, ext: Extensions = EXT) -> CommandRejected:
    with pytest.raises(CommandRejected) as info:
        parse_command(line, session(state), ext)
    return info.value


# -- commands ----------------------------------------------------------------------------


def test_mail_keeps_the_path_and_parameters_as_sent() -> None:
    cmd = parse_command(b"MAIL FROM:<Alice@Example.COM> SIZE=1234 BODY=8BITMIME", session(), EXT)
    assert cmd.name == "MAIL" and cmd.path == "Alice@Example.COM"
    assert cmd.params == (("SIZE", "1234"), ("BODY", "8BITMIME"))
    assert cmd.raw_params == "SIZE=1234 BODY=8BITMIME"
    assert cmd.param("SIZE") == "1234"


def test_verbs_are_case_insensitive_and_a_space_after_the_colon_is_tolerated() -> None:
    cmd = parse_command(b"mail from: <a@b.example>", session(), EXT)
    assert cmd.path == "a@b.example"
    assert parse_command(b"rcpt To:<c@d.example>", session(State.MAIL), EXT).path == "c@d.example"


def test_null_reverse_path_and_source_route() -> None:
    assert parse_command(b"MAIL FROM:<>", session(), EXT).path == ""
    assert parse_command(b"RCPT TO:<@relay.example:bob@x.example>", session(State.MAIL), EXT).path == "bob@x.example"


@pytest.mark.parametrize("line, code", [
    (b"MAIL FROM:alice@example.com", 501),  # no angle brackets
    (b"MAIL FROM:<alice@example.com>FOO", 501),
    (b"MAIL FROM:<alice>", 501),
    (b"MAIL FROM:<a@b.example> SIZE=x", 501),
    (b"MAIL FROM:<a@b.example> BODY=BINARY", 501),
    (b"MAIL FROM:<a@b.example> RET=FULL", 555),  # DSN is not offered
    (b"MAIL FROM:<a@b.example> SIZE", 501),
    (b"XYZZY", 500),
    (b"EXPN list", 502),
    (b"MAIL FROM:<a\xc3\xa9@b.example>", 501),  # UTF-8 needs SMTPUTF8 (not offered below)
])
def test_bad_commands_get_their_codes(line: bytes, code: int) -> None:
    ext = Extensions(size=True, eightbitmime=True, smtputf8=False, chunking=False)
    assert rejected(line, ext=ext).code == code


def test_utf8_address_with_smtputf8() -> None:
    cmd = parse_command("MAIL FROM:<jörg@bücher.example> SMTPUTF8".encode(), session(), EXT)
    assert cmd.path == "jörg@bücher.example" and any(key == "SMTPUTF8" for key, _ in cmd.params)


def test_rcpt_needs_a_domain_and_takes_no_parameters() -> None:
    assert rejected(b"RCPT TO:<postmaster>", State.MAIL).code == 501
    assert rejected(b"RCPT TO:<a@b.example> NOTIFY=NEVER", State.MAIL).code == 555


@pytest.mark.parametrize("line, state", [
    (b"MAIL FROM:<a@b.example>", State.INITIAL),   # RFC 5321 §4.1.4: EHLO first
    (b"RCPT TO:<a@b.example>", State.READY),       # MAIL first
    (b"DATA", State.MAIL),                          # no recipient accepted
    (b"MAIL FROM:<a@b.example>", State.RCPT),      # nested transaction
    (b"AUTH PLAIN", State.MAIL),                    # RFC 4954 §4: not during a transaction
    (b"STARTTLS", State.INITIAL),
    (b"DATA", State.CHUNKING),                      # RFC 3030 §2: only BDAT after BDAT
    (b"EHLO x", State.CHUNKING),
])
def test_state_table(line: bytes, state: State) -> None:
    err = rejected(line, state)
    assert (err.code, err.enhanced) == (503, "5.5.1")
    assert err.wire.startswith(b"503 5.5.1 Bad sequence of commands")


def test_bdat() -> None:
    cmd = parse_command(b"BDAT 1000 LAST", session(State.RCPT), EXT)
    assert (cmd.size, cmd.last) == (1000, True)
    assert parse_command(b"BDAT 0", session(State.CHUNKING), EXT).last is False
    assert rejected(b"BDAT 10 FIRST", State.RCPT).code == 501
    assert rejected(b"BDAT 10", State.RCPT, Extensions(chunking=False)).code == 502


def test_auth_and_ehlo() -> None:
    cmd = parse_command(b"AUTH plain AGFsaWNlAHNlY3JldA==", session(), EXT)
    assert (cmd.mechanism, cmd.initial_response) == ("PLAIN", b"AGFsaWNlAHNlY3JldA==")
    assert parse_command(b"EHLO [192.168.1.2]", session(State.INITIAL), EXT).domain == "[192.168.1.2]"
    assert rejected(b"EHLO", State.INITIAL).code == 501


def test_session_transitions() -> None:
    s = session(State.RCPT)
    s.transaction_done()
    assert s.state is State.READY
    s.tls_started()
    assert s.state is State.INITIAL and not s.esmtp
    s.reset()
    assert s.state is State.INITIAL  # RSET does not greet


@given(st.binary(max_size=300), st.sampled_from(list(State)))
@settings(max_examples=500)
def test_random_command_lines_only_raise_the_modules_error(line: bytes, state: State) -> None:
    try:
        parse_command(line, session(state), EXT)
    except smtp.SmtpError:
        pass


# -- command reader ----------------------------------------------------------------------


def test_reader_lines_and_limits() -> None:
    reader = CommandReader(limit=16)
    reader.feed(b"EHLO a\r\nNOOP\nxxxxxxxxxxxxxxxxxxxxxxx")
    assert reader.next_line() == b"EHLO a"
    assert reader.next_line() == b"NOOP"
    with pytest.raises(smtp.LineTooLong):
        reader.next_line()
    reader.feed(b"yyy\r\nQUIT\r\n")
    assert reader.next_line() == b"QUIT"  # the rest of the long line was skipped
    assert reader.next_line() is None


def test_reader_take_and_discard() -> None:
    reader = CommandReader()
    reader.feed(b"12345STARTTLS-injected\r\n")
    assert reader.take(5) == b"12345"
    assert reader.discard_buffered() == len(b"STARTTLS-injected\r\n")
    assert reader.next_line() is None


@given(st.binary(max_size=400), st.lists(st.integers(min_value=0, max_value=400), max_size=8))
@settings(max_examples=300)
def test_reader_split_invariance(data: bytes, cuts: list[int]) -> None:
    def lines(pieces: list[bytes]) -> list[object]:
        reader = CommandReader(limit=64)
        out: list[object] = []
        for piece in pieces:
            reader.feed(piece)
            while True:
                try:
                    line = reader.next_line()
                except smtp.LineTooLong:
                    out.append("too long")
                    continue
                if line is None:
                    break
                out.append(line)
        return out

    whole = lines([data])
    split = lines(split_at(data, cuts))
    # A too-long line without its end yet is reported when the limit is reached: the
    # lines themselves never depend on the split.
    assert [x for x in split if x != "too long"] == [x for x in whole if x != "too long"]


# -- DATA ----------------------------------------------------------------------------------


def scan(pieces: list[bytes], max_size: int | None = None) -> tuple[bytes, bytes, DataScanner, bool]:
    scanner = DataScanner(max_size)
    forwarded, rest, done = b"", b"", False
    for piece in pieces:
        if done:
            rest += piece
            continue
        step = scanner.feed(piece)
        forwarded += step.forward
        done = step.done
        rest += step.rest
    return forwarded, rest, scanner, done


def test_data_is_relayed_as_received_with_the_terminator() -> None:
    data = b"Subject: x\r\n\r\n..stuffed\r\n.\r\nQUIT\r\n"
    forwarded, rest, scanner, done = scan([data])
    assert done and forwarded == b"Subject: x\r\n\r\n..stuffed\r\n.\r\n" and rest == b"QUIT\r\n"
    assert scanner.size == len(b"Subject: x\r\n\r\n..stuffed\r\n")


def test_empty_message_ends_at_once() -> None:
    forwarded, rest, scanner, done = scan([b".\r\nNOOP\r\n"])
    assert (forwarded, rest, scanner.size, done) == (b".\r\n", b"NOOP\r\n", 0, True)


def test_terminator_split_over_pieces() -> None:
    forwarded, rest, _, done = scan([b"a\r", b"\n", b".", b"\r", b"\nRSET\r\n"])
    assert done and forwarded == b"a\r\n.\r\n" and rest == b"RSET\r\n"


@pytest.mark.parametrize("data", [
    b"a\n.\nb\r\n.\r\n",        # LF . LF
    b"a\n.\r\nMAIL FROM:<x@y>\r\n.\r\n",  # LF . CRLF: the classic smuggling
    b"a\r\n.\nb\r\n.\r\n",      # CRLF . LF
    b".\nb\r\n.\r\n",           # at the start
])
def test_bare_lf_dot_lines_are_refused_and_not_forwarded(data: bytes) -> None:
    forwarded, _, scanner, done = scan([data])
    assert done and scanner.refusal == "bare_lf"
    assert b"\n." not in forwarded and not forwarded.endswith(b".\r\n")


def test_bare_lf_elsewhere_is_fine() -> None:
    data = b"a\nb\n.x\n\r\n.\r\n"
    forwarded, _, scanner, _ = scan([data])
    assert scanner.refusal is None and forwarded == data


def test_size_limit() -> None:
    forwarded, _, scanner, done = scan([b"x" * 50, b"y" * 60 + b"\r\n.\r\n"], max_size=100)
    assert done and scanner.refusal == "size" and forwarded == b"x" * 50
    assert scanner.size == 112


message_data = st.lists(
    st.sampled_from([b"a", b".", b"\r\n", b"\n", b"\r", b"..", b"\xe9", b"text "]), max_size=60
).map(b"".join)


@given(message_data, st.lists(st.integers(min_value=0, max_value=500), max_size=10), st.binary(max_size=20))
@settings(max_examples=500)
def test_data_split_invariance(body: bytes, cuts: list[int], after: bytes) -> None:
    data = body + b"\r\n.\r\n" + after
    expected = scan([data])
    got = scan(split_at(data, cuts))
    assert got[1] == expected[1] and got[3] == expected[3]
    assert (got[2].size, got[2].refusal) == (expected[2].size, expected[2].refusal)
    if expected[2].refusal is not None:
        # What went upstream before the refusal depends on the split (that transaction is
        # aborted), but it is always a prefix that stops before the bare-LF dot line.
        assert data.startswith(got[0])
        assert DataScanner().feed(got[0]).forward == got[0]  # nothing refusable in it
    else:
        assert got[0] == expected[0]
        end = data.find(b"\r\n.\r\n") if not data.startswith(b".\r\n") else -2
        assert expected[0] == data[: end + 5]


# -- replies -------------------------------------------------------------------------------


def test_reply_building() -> None:
    assert smtp.reply(250, "OK", "2.0.0") == b"250 2.0.0 OK\r\n"
    assert smtp.reply(250, ["a", "b"], "2.1.5") == b"250-2.1.5 a\r\n250 2.1.5 b\r\n"
    assert smtp.ehlo_reply("gw", "client", ["SIZE 10", "8BITMIME"]) == (
        b"250-gw greets client\r\n250-SIZE 10\r\n250 8BITMIME\r\n")


def test_reply_parser() -> None:
    parser = ReplyParser()
    parser.feed(b"250-smtp.example\r\n250-SIZE 35882577\r\n250 8BITMIME\r\n535-5.7.8 Username")
    ehlo = parser.next_reply()
    assert ehlo == Reply(250, ("smtp.example", "SIZE 35882577", "8BITMIME"))
    assert parser.next_reply() is None
    parser.feed(b" and Password not accepted.\r\n535 5.7.8 https://support.google.com/x\r\n")
    auth = parser.next_reply()
    assert auth is not None and auth.code == 535 and auth.enhanced == "5.7.8"
    assert auth.text == "Username and Password not accepted. https://support.google.com/x"
    assert auth.wire() == b"535-5.7.8 Username and Password not accepted.\r\n535 5.7.8 https://support.google.com/x\r\n"


@pytest.mark.parametrize("data", [b"hello\r\n", b"250-a\r\n251 b\r\n", b"2" * 5000])
def test_bad_replies(data: bytes) -> None:
    parser = ReplyParser()
    parser.feed(data)
    with pytest.raises(smtp.ReplyError):
        while parser.next_reply() is not None:
            pass


@given(st.binary(max_size=600), st.lists(st.integers(min_value=0, max_value=600), max_size=6))
@settings(max_examples=300)
def test_reply_parser_split_invariance_and_errors(data: bytes, cuts: list[int]) -> None:
    def parse(pieces: list[bytes]) -> tuple[list[Reply], bool]:
        parser = ReplyParser()
        out: list[Reply] = []
        try:
            for piece in pieces:
                parser.feed(piece)
                while (r := parser.next_reply()) is not None:
                    out.append(r)
        except smtp.ReplyError:
            return out, True
        return out, False

    whole, whole_failed = parse([data])
    split, split_failed = parse(split_at(data, cuts))
    assert split == whole and split_failed == whole_failed


# The rule of bare-LF dot lines, written as a regular expression: the reference for the scanner.
BARE_LF_DOT = re.compile(rb"(?<!\r)\n\.\r?\n|\r\n\.\n")


@given(message_data)
@settings(max_examples=500)
def test_bare_lf_rule_matches_its_reference(body: bytes) -> None:
    data = body + b"\r\n.\r\n"
    _, _, scanner, done = scan([data])
    end = (b"\r\n" + data).find(b"\r\n.\r\n")
    expected = BARE_LF_DOT.search(b"\r\n" + data, 0, end + 5) is not None
    assert done and (scanner.refusal == "bare_lf") == expected


def test_the_session_has_one_handler_per_command_the_parser_lets_through() -> None:
    from gateway.frontends.smtp_session import SmtpSession

    assert set(SmtpSession.HANDLERS) == frozenset().union(*smtp.ALLOWED.values())
