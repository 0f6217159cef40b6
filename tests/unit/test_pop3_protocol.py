"""The sans-IO POP3 core: parsing, states, responses, byte-stuffing, sizes and TOP."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol import pop3, sasl
from gateway.protocol.pop3 import (
    Code,
    CommandRejected,
    LineReader,
    LineTooLong,
    MessageEncoder,
    SessionState,
    State,
    parse_command,
)

# -- helpers -----------------------------------------------------------------------


def encode(message: bytes, chunk_sizes: list[int] | None = None, top: int | None = None) -> tuple[bytes, MessageEncoder]:
    encoder = MessageEncoder(top)
    out = bytearray()
    pos = 0
    for size in chunk_sizes or []:
        out += encoder.feed(message[pos : pos + size])
        pos += size
    out += encoder.feed(message[pos:])
    out += encoder.finish()
    return bytes(out), encoder


def unstuff(body: bytes) -> bytes:
    """What a POP3 client does with a multi-line body: drop the terminator, un-stuff."""
    assert body.endswith(b"\r\n.\r\n") or body == b".\r\n"
    body = body[:-3]
    lines = body.split(b"\r\n")
    out = []
    for line in lines:
        out.append(line[1:] if line.startswith(b".") else line)
    return b"\r\n".join(out)


def crlf_normalise(data: bytes) -> bytes:
    """Reference normaliser written byte by byte (the slow, obvious way)."""
    out = bytearray()
    for i, byte in enumerate(data):
        if byte == 0x0A and (i == 0 or data[i - 1] != 0x0D):
            out += b"\r"
        out.append(byte)
    return bytes(out)


def transaction() -> SessionState:
    session = SessionState()
    session.logged_in()
    return session


# -- commands and states ------------------------------------------------------------


def test_commands_are_case_insensitive_and_parsed():
    session = transaction()
    assert parse_command(b"stat", session) == pop3.Command("STAT")
    assert parse_command(b"LiSt 3", session) == pop3.Command("LIST", msg=3)
    assert parse_command(b"list", session) == pop3.Command("LIST")
    assert parse_command(b"TOP 2 0", session) == pop3.Command("TOP", msg=2, lines=0)
    assert parse_command(b"retr 12", session).msg == 12
    assert parse_command(b"uidl", session) == pop3.Command("UIDL")


@pytest.mark.parametrize(
    "line",
    [b"RETR", b"RETR 0", b"RETR -1", b"RETR x", b"RETR 1 2", b"TOP 1", b"TOP 1 -2",
     b"LIST 1 2", b"STAT now", b"DELE 99999999999", b"RETR +1", b"NOOP x"],
)
def test_bad_arguments_are_rejected(line):
    with pytest.raises(CommandRejected):
        parse_command(line, transaction())


def test_state_table():
    session = SessionState()
    for line in (b"STAT", b"RETR 1", b"LIST", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 1"):
        with pytest.raises(CommandRejected, match="not allowed in the AUTHORIZATION"):
            parse_command(line, session)
    with pytest.raises(CommandRejected, match="USER first"):
        parse_command(b"PASS secret", session)
    session.user_accepted("alice")
    assert parse_command(b"PASS  two words ", session).arg == " two words "
    session.logged_in()
    for line in (b"USER bob", b"PASS x", b"AUTH PLAIN", b"STLS"):
        with pytest.raises(CommandRejected, match="TRANSACTION"):
            parse_command(line, session)
    assert session.quit() is True
    with pytest.raises(CommandRejected):
        parse_command(b"NOOP", session)


def test_quit_in_authorization_does_not_enter_update():
    session = SessionState()
    session.user_accepted("alice")
    assert session.quit() is False
    assert session.state is State.AUTHORIZATION and session.finished
    assert session.pending_user is None
    with pytest.raises(CommandRejected, match="ended"):
        parse_command(b"CAPA", session)
    with pytest.raises(RuntimeError):
        session.logged_in()  # still refused: no login after QUIT either


def test_unknown_empty_and_apop():
    session = SessionState()
    with pytest.raises(CommandRejected, match="Unknown"):
        parse_command(b"XYZZY", session)
    with pytest.raises(CommandRejected, match="Empty"):
        parse_command(b"  ", session)
    with pytest.raises(CommandRejected, match="APOP"):
        parse_command(b"APOP alice 0123456789abcdef", session)
    with pytest.raises(CommandRejected):
        parse_command(b"US\x00ER x", session)


def test_auth_forms():
    session = SessionState()
    assert parse_command(b"AUTH", session) == pop3.Command("AUTH")
    assert parse_command(b"auth plain", session).mechanism == "PLAIN"
    cmd = parse_command(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", session)
    assert cmd.initial_response == b"AGFsaWNlAHNlY3JldA=="
    with pytest.raises(CommandRejected):
        parse_command(b"AUTH PLAIN a b", session)


def test_user_argument_rejects_control_characters():
    with pytest.raises(CommandRejected):
        parse_command(b"USER al\x07ice", SessionState())
    with pytest.raises(CommandRejected):
        parse_command(b"USER", SessionState())


# -- SASL PLAIN ----------------------------------------------------------------------


def test_plain_decoding():
    # POP3's AUTH PLAIN uses the one PLAIN decoder (gateway.protocol.sasl).
    blob = base64.b64encode(b"\0alice\0s3cret pass")
    assert sasl.decode_plain(blob) == sasl.PlainCredentials("", "alice", "s3cret pass")
    assert sasl.b64decode(b"=") == b""
    with pytest.raises(sasl.SASLError):
        sasl.b64decode(b"not base64!")
    with pytest.raises(sasl.SASLError):
        sasl.decode_plain(base64.b64encode(b"alice\0secret"))
    with pytest.raises(sasl.SASLError):
        sasl.decode_plain(base64.b64encode(b"\0\0secret"))


# -- line framing --------------------------------------------------------------------


def test_line_reader_splits_crlf_and_lf():
    reader = LineReader()
    reader.feed(b"STAT\r\nLIST 1\nNO")
    assert reader.next_line() == b"STAT"
    assert reader.next_line() == b"LIST 1"
    assert reader.next_line() is None
    reader.feed(b"OP\r\n")
    assert reader.next_line() == b"NOOP"


def test_line_limit_is_255_octets_including_crlf():
    reader = LineReader()
    ok_line = b"USER " + b"a" * (pop3.MAX_COMMAND_LINE - 7)
    reader.feed(ok_line + b"\r\n")
    assert reader.next_line() == ok_line
    reader.feed(b"USER " + b"a" * (pop3.MAX_COMMAND_LINE - 6) + b"\r\nNOOP\r\n")
    with pytest.raises(LineTooLong):
        reader.next_line()
    assert reader.next_line() == b"NOOP"


def test_overlong_line_arriving_in_pieces_is_reported_once_and_skipped():
    reader = LineReader()
    reader.feed(b"x" * 300)
    with pytest.raises(LineTooLong):
        reader.next_line()
    reader.feed(b"y" * 5000)
    assert reader.next_line() is None
    reader.feed(b"zzz\r\nQUIT\r\n")
    assert reader.next_line() == b"QUIT"


def test_discard_buffered_for_stls():
    reader = LineReader()
    reader.feed(b"STLS\r\nUSER injected\r\n")
    assert reader.next_line() == b"STLS"
    assert reader.discard_buffered() == len(b"USER injected\r\n")
    assert reader.next_line() is None


@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=300))
def test_line_reader_random_input_only_raises_its_own_errors(data, step):
    reader = LineReader()
    session = SessionState()
    for i in range(0, len(data), step):
        reader.feed(data[i : i + step])
        while True:
            try:
                line = reader.next_line()
            except LineTooLong:
                continue
            if line is None:
                break
            assert len(line) < pop3.MAX_COMMAND_LINE
            try:
                parse_command(line, session)
            except pop3.ProtocolError:
                pass


# -- responses -----------------------------------------------------------------------


def test_status_lines_with_codes():
    assert pop3.ok("2 320") == b"+OK 2 320\r\n"
    assert pop3.ok() == b"+OK\r\n"
    assert pop3.err("Mailbox is locked", Code.IN_USE) == b"-ERR [IN-USE] Mailbox is locked\r\n"
    assert pop3.err("down\r\n+OK injected", Code.SYS_TEMP) == b"-ERR [SYS/TEMP] down +OK injected\r\n"
    assert len(pop3.err("x" * 2000)) == pop3.MAX_RESPONSE_LINE


def test_multiline_stuffs_and_terminates():
    assert pop3.multiline(pop3.ok(), [b"1 100", b".x"]) == b"+OK\r\n1 100\r\n..x\r\n.\r\n"
    assert pop3.multiline(pop3.ok(), []) == b"+OK\r\n.\r\n"


def test_capabilities_depend_on_state():
    before = pop3.capability_lines(
        state=State.AUTHORIZATION, stls_available=True, user_login_allowed=False,
        sasl_mechanisms=["PLAIN"], implementation="mailgate",
    )
    assert b"STLS" in before and b"USER" not in before
    assert b"IMPLEMENTATION mailgate" in before
    allowed = pop3.capability_lines(
        state=State.AUTHORIZATION, stls_available=False, user_login_allowed=True,
        sasl_mechanisms=["PLAIN"], implementation=None,
    )
    assert allowed == [b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE", b"USER", b"SASL PLAIN"]
    after = pop3.capability_lines(
        state=State.TRANSACTION, stls_available=True, user_login_allowed=True,
        sasl_mechanisms=["PLAIN"], implementation=None,
    )
    assert after == [b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE"]


# -- message data ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "wire", "size"),
    [
        (b"Subject: a\r\n\r\nbody\r\n", b"Subject: a\r\n\r\nbody\r\n.\r\n", 20),
        (b"Subject: a\n\nbody\n", b"Subject: a\r\n\r\nbody\r\n.\r\n", 20),
        (b"A: b\r\n\r\n.hidden\r\n..two\r\n", b"A: b\r\n\r\n..hidden\r\n...two\r\n.\r\n", 24),
        (b".first\r\n", b"..first\r\n.\r\n", 8),
        (b"A: b\r\n\r\nno final newline", b"A: b\r\n\r\nno final newline\r\n.\r\n", 24),
        (b"A: b\r\n\r\nlone\rcr\r.x\r\n", b"A: b\r\n\r\nlone\rcr\r.x\r\n.\r\n", 20),
        (b"A: b\r\n\r\nends in cr\r", b"A: b\r\n\r\nends in cr\r\r\n.\r\n", 19),
        (b"x\r\r\ny", b"x\r\r\ny\r\n.\r\n", 5),
        (b"", b".\r\n", 0),
        (b"A: b\n\n.\n", b"A: b\r\n\r\n..\r\n.\r\n", 11),
    ],
)
def test_retr_encoding_matches_dovecot_rules(message, wire, size):
    for chunking in ([], [1] * len(message), [3, 2, 7]):
        out, encoder = encode(message, chunking)
        assert out == wire
        assert encoder.octets == size


def test_top_returns_header_blank_line_and_k_body_lines():
    message = b"From: a\r\nSubject: s\r\n\r\nline1\r\n.line2\r\nline3\r\n"
    assert encode(message, top=0)[0] == b"From: a\r\nSubject: s\r\n\r\n.\r\n"
    assert encode(message, top=2)[0] == b"From: a\r\nSubject: s\r\n\r\nline1\r\n..line2\r\n.\r\n"
    assert encode(message, top=10)[0] == encode(message)[0]
    assert encode(b"From: a\n\nx\ny", top=5)[0] == b"From: a\r\n\r\nx\r\ny\r\n.\r\n"
    assert encode(b"\r\nbody1\r\nbody2\r\n", top=1)[0] == b"\r\nbody1\r\n.\r\n"
    assert encode(b"Only: header\r\n", top=1)[0] == b"Only: header\r\n.\r\n"


def test_top_reports_done_so_the_driver_can_stop():
    encoder = MessageEncoder(top_lines=1)
    encoder.feed(b"A: b\r\n\r\nfirst\r\n")
    assert encoder.done
    assert encoder.feed(b"x" * 10_000) == b""
    assert encoder.finish() == b".\r\n"


def test_encoder_refuses_misuse():
    encoder = MessageEncoder()
    encoder.finish()
    with pytest.raises(RuntimeError):
        encoder.feed(b"x")
    with pytest.raises(RuntimeError):
        encoder.finish()


# -- properties ----------------------------------------------------------------------

message_bytes = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"a", b"Subject: x", b"\x00", b"\xff", b" "]),
    max_size=60,
).map(b"".join) | st.binary(max_size=300)


def chunkings(data: bytes):
    return st.lists(st.integers(min_value=0, max_value=max(1, len(data))), max_size=10)


@given(st.data())
@settings(max_examples=300)
def test_output_does_not_depend_on_chunk_boundaries(data):
    message = data.draw(message_bytes)
    top = data.draw(st.none() | st.integers(min_value=0, max_value=5))
    whole, whole_encoder = encode(message, top=top)
    split, split_encoder = encode(message, data.draw(chunkings(message)), top=top)
    assert split == whole
    assert split_encoder.octets == whole_encoder.octets


def expected_top(normalised: bytes, k: int) -> bytes:
    """Reference TOP: header through its blank line, then k body lines (each ends at LF)."""
    if normalised.startswith(b"\r\n"):
        header_end = 2
    else:
        found = normalised.find(b"\n\r\n")
        if found < 0:
            return normalised
        header_end = found + 3
    body_lines = normalised[header_end:].splitlines(keepends=True)
    # splitlines also splits at lone CR: rejoin so that only LF ends a line
    lines: list[bytes] = []
    for piece in body_lines:
        if lines and not lines[-1].endswith(b"\n"):
            lines[-1] += piece
        else:
            lines.append(piece)
    return normalised[:header_end] + b"".join(lines[:k])


def as_received(normalised: bytes) -> bytes:
    """What the client gets after un-stuffing: a final CRLF is added when missing."""
    if normalised and not normalised.endswith(b"\n"):
        return normalised + b"\r\n"
    return normalised


@given(message_bytes)
@settings(max_examples=300)
def test_unstuffing_gives_back_the_crlf_normalised_message(message):
    wire, encoder = encode(message)
    normalised = crlf_normalise(message)
    assert unstuff(wire) == as_received(normalised)
    assert encoder.octets == len(normalised)
    # Nothing inside the body can look like the terminator.
    assert wire == b".\r\n" or wire.find(b"\r\n.\r\n") == len(wire) - 5


@given(message_bytes, st.integers(min_value=0, max_value=6))
@settings(max_examples=300)
def test_top_sends_the_header_and_k_body_lines(message, k):
    wire, encoder = encode(message, top=k)
    expected = expected_top(crlf_normalise(message), k)
    assert unstuff(wire) == as_received(expected)
    assert encoder.octets == len(expected)


# What Dovecot 2.3.19's own POP3 server sent for these stored messages (recorded in the lab:
# message as stored in Maildir -> RETR body, TOP 1 body, LIST size). mailgate gets the same
# bytes from IMAP FETCH BODY[] (CRLF form) and must produce the same answers.
DOVECOT_RECORDED = [
    (b"Subject: lf\n\nline1\n.dot\nline3\n",
     b"Subject: lf\r\n\r\nline1\r\n..dot\r\nline3\r\n.\r\n", b"Subject: lf\r\n\r\nline1\r\n.\r\n", 35),
    (b"Subject: nofinal\r\n\r\nbody without newline",
     b"Subject: nofinal\r\n\r\nbody without newline\r\n.\r\n",
     b"Subject: nofinal\r\n\r\nbody without newline\r\n.\r\n", 40),
    (b"Subject: lonecr\r\n\r\na\rb\r.c\r\n.d\rx\r\n",
     b"Subject: lonecr\r\n\r\na\rb\r.c\r\n..d\rx\r\n.\r\n", b"Subject: lonecr\r\n\r\na\rb\r.c\r\n.\r\n", 33),
    (b"Subject: endcr\r\n\r\nends with cr\r",
     b"Subject: endcr\r\n\r\nends with cr\r\r\n.\r\n", b"Subject: endcr\r\n\r\nends with cr\r\r\n.\r\n", 31),
    (b"Subject: crcrlf\r\n\r\nx\r\r\ny\r\n",
     b"Subject: crcrlf\r\n\r\nx\r\r\ny\r\n.\r\n", b"Subject: crcrlf\r\n\r\nx\r\r\n.\r\n", 26),
    (b"Subject: nobody\r\nX: y\r\n",
     b"Subject: nobody\r\nX: y\r\n.\r\n", b"Subject: nobody\r\nX: y\r\n.\r\n", 23),
    (b"Subject: mixed\n\r\nl1\r\nl2\nl3\r\n\r\nl5\n",
     b"Subject: mixed\r\n\r\nl1\r\nl2\r\nl3\r\n\r\nl5\r\n.\r\n", b"Subject: mixed\r\n\r\nl1\r\n.\r\n", 36),
]


@pytest.mark.parametrize(("stored", "retr", "top1", "size"), DOVECOT_RECORDED)
def test_same_bytes_as_dovecot_pop3(stored, retr, top1, size):
    for chunking in ([], [1] * len(stored), [5, 1, 1, 9]):
        out, encoder = encode(stored, chunking)
        assert out == retr
        assert encoder.octets == size
        assert encode(stored, chunking, top=1)[0] == top1
