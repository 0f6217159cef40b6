"""Byte-exact and property tests for gateway.protocol.imap_responses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.imap_grammar import Atom
from gateway.protocol.imap_responses import (
    LiteralChunk,
    LiteralEnd,
    LiteralStart,
    ProtocolError,
    Response,
    ResponseFramer,
    capabilities_of,
    rewrite_capabilities,
)
from tests.fixtures.splits import split_at


def feed_all(data: bytes, framer: ResponseFramer | None = None, step: int | None = None) -> list:
    framer = framer or ResponseFramer()
    if step is None:
        return framer.feed(data)
    events = []
    for i in range(0, len(data), step):
        events += framer.feed(data[i : i + step])
    return events


def merged(events: list) -> list:
    """Events with consecutive literal chunks joined (chunking depends on how input arrived)."""
    out: list = []
    for e in events:
        if isinstance(e, LiteralChunk) and out and isinstance(out[-1], LiteralChunk):
            out[-1] = LiteralChunk(out[-1].data + e.data)
        else:
            out.append(e)
    return out


# ---------------------------------------------------------------- first-line parsing


def test_tagged_status_with_code() -> None:
    [r] = feed_all(b"a001 OK [READ-WRITE] SELECT completed\r\n")
    assert (r.kind, r.tag, r.keyword, r.status, r.code, r.text) == (
        "tagged", b"a001", b"OK", b"OK", b"READ-WRITE", b"SELECT completed")
    assert r.ok and r.raw == b"a001 OK [READ-WRITE] SELECT completed\r\n"


def test_untagged_numeric_and_continuation() -> None:
    events = feed_all(b"* 23 EXISTS\r\n* bye [ALERT] going\r\n+ \r\n+\r\n+ send more\r\n")
    assert [(e.kind, e.number, e.keyword, e.status, e.code, e.text) for e in events] == [
        ("untagged", 23, b"EXISTS", None, None, b""),
        ("untagged", None, b"BYE", b"BYE", b"ALERT", b"going"),
        ("continuation", None, None, None, None, b""),
        ("continuation", None, None, None, None, b""),
        ("continuation", None, None, None, None, b"send more"),
    ]


def test_unclosed_response_code_is_text() -> None:
    [r] = feed_all(b"* OK [ALERT unclosed\r\n")
    assert (r.code, r.text) == (None, b"[ALERT unclosed")


def test_gmail_json_challenge_is_continuation_text() -> None:
    [r] = feed_all(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n")
    assert r.kind == "continuation" and r.text == b"eyJzdGF0dXMiOiI0MDEifQ=="


def test_status_text_ending_in_braces_is_not_a_literal() -> None:
    events = feed_all(b"* OK look {5}\r\nA1 NO bad {3}\r\n+ go {2}\r\n")
    assert [e.text for e in events] == [b"look {5}", b"bad {3}", b"go {2}"]


@pytest.mark.parametrize(
    "line",
    [b"garbage\r\n", b"*\r\n", b"* \r\n", b"A(1 OK x\r\n", b"A1 FETCH x\r\n"],
)
def test_malformed_first_line(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        feed_all(line)


# ---------------------------------------------------------------- literals


FETCH = b"* 12 FETCH (UID 7 FLAGS (\\Seen) BODY[] {12}\r\nhello\r\nbye\r\n MODSEQ (5))\r\nA2 OK done\r\n"


def test_small_literal_attached_and_parsed() -> None:
    fetch, done = feed_all(FETCH)
    assert fetch.lines == (b"* 12 FETCH (UID 7 FLAGS (\\Seen) BODY[] {12}", b" MODSEQ (5))")
    assert fetch.literals == (b"hello\r\nbye\r\n", None)
    assert fetch.fetch() == {b"UID": 7, b"FLAGS": (Atom(b"\\Seen"),), b"BODY[]": b"hello\r\nbye\r\n",
                             b"MODSEQ": (5,)}
    assert done.raw == b"A2 OK done\r\n"
    assert fetch.raw + done.raw == FETCH


def test_values_of_keyword_responses() -> None:
    caps, lst, exists = feed_all(b'* CAPABILITY IMAP4rev1 IDLE\r\n* LIST (\\HasNoChildren \\Trash) "/" {5}\r\nTrash\r\n* 3 EXISTS\r\n')
    assert caps.values() == (b"IMAP4rev1", b"IDLE")
    assert lst.values() == ((b"\\HasNoChildren", b"\\Trash"), b"/", b"Trash")
    assert isinstance(lst.values()[0][0], Atom) and not isinstance(lst.values()[2], Atom)  # type: ignore[index]
    assert exists.values() == ()


def test_fetch_items_sections_nil_and_the_plain_fast_path() -> None:
    plain, odd, nil = feed_all(b"* 1 FETCH (UID 4 RFC822.SIZE 99 X-GM-MSGID 123)\r\n"
                               b'* 2 FETCH (uid 5 BODY[HEADER.FIELDS (FROM TO)]<0> "a \\"b\\"" ENVELOPE NIL)\r\n'
                               b"* 3 FETCH (UID 6 BODY[] NIL)\r\n")
    assert plain.fetch() == {b"UID": 4, b"RFC822.SIZE": 99, b"X-GM-MSGID": 123}
    assert odd.fetch() == {b"UID": 5, b"BODY[HEADER.FIELDS (FROM TO)]<0>": b'a "b"', b"ENVELOPE": None}
    assert nil.fetch() == {b"UID": 6, b"BODY[]": None}
    [exists] = feed_all(b"* 3 EXISTS\r\n")
    for bad in (exists, *feed_all(b"* 1 FETCH (UID)\r\n* 1 FETCH UID 3\r\n* 1 FETCH (UID (3)\r\n")):
        with pytest.raises(ValueError):
            bad.fetch()


def test_big_literal_is_streamed_in_arrival_slices() -> None:
    body = bytes(range(256)) * 40  # 10 KiB
    wire = b"* 1 FETCH (UID 9 BODY[] {%d}\r\n" % len(body) + body + b")\r\nA1 OK\r\n"
    framer = ResponseFramer(literal_stream_threshold=1024)
    events = feed_all(wire, framer, step=1000)
    start = events[0]
    assert isinstance(start, LiteralStart)
    assert (start.number, start.keyword, start.size) == (1, b"FETCH", len(body))
    assert start.line == b"* 1 FETCH (UID 9 BODY[] {%d}" % len(body)
    chunks = [e for e in events if isinstance(e, LiteralChunk)]
    assert b"".join(c.data for c in chunks) == body
    assert max(len(c.data) for c in chunks) <= 1000
    end_i = next(i for i, e in enumerate(events) if isinstance(e, LiteralEnd))
    tail = events[end_i + 1]
    assert isinstance(tail, Response) and tail.streamed and tail.raw == b")\r\n"
    assert tail.literals == (b"", None)
    assert tail.fetch() == {b"UID": 9, b"BODY[]": b""}
    assert b"".join(e.raw for e in events) == wire
    assert framer.at_boundary


def test_literal8_and_zero_length_literal() -> None:
    r1, r2 = feed_all(b"* 1 FETCH (BINARY[] ~{3}\r\nabc)\r\n* 2 FETCH (BODY[] {0}\r\n)\r\n")
    assert r1.literals == (b"abc", None) and r2.literals == (b"", None)


def test_zero_threshold_streams_even_small_literals() -> None:
    events = feed_all(b"* 1 FETCH (BODY[] {2}\r\nab)\r\n", ResponseFramer(literal_stream_threshold=0))
    assert [type(e) for e in events] == [LiteralStart, LiteralChunk, LiteralEnd, Response]


def test_truncated_stream_is_visible() -> None:
    framer = ResponseFramer(literal_stream_threshold=4)
    framer.feed(b"* 1 FETCH (BODY[] {10}\r\nabc")
    assert framer.in_response and not framer.at_boundary
    framer2 = ResponseFramer()
    framer2.feed(b"A1 OK done\r\n")
    assert framer2.at_boundary and not framer2.in_response


# ---------------------------------------------------------------- limits


def test_line_limit() -> None:
    framer = ResponseFramer(max_line=100)
    framer.feed(b"* OK " + b"x" * 90)
    with pytest.raises(ProtocolError):
        framer.feed(b"x" * 20)
    with pytest.raises(ProtocolError):  # unusable afterwards
        framer.feed(b"\r\n")
    assert feed_all(b"* OK " + b"x" * 95 + b"\r\n", ResponseFramer(max_line=100))


def test_response_limit_applies_to_buffered_literals_only() -> None:
    many = b"* 1 FETCH (A {60}\r\n" + b"a" * 60 + b" B {60}\r\n" + b"b" * 60 + b")\r\n"
    with pytest.raises(ProtocolError):
        feed_all(many, ResponseFramer(max_response=100, literal_stream_threshold=100))
    # streamed literals do not count
    assert feed_all(many, ResponseFramer(max_response=100, literal_stream_threshold=10))


# ---------------------------------------------------------------- CAPABILITY helpers


def test_rewrite_untagged_capability() -> None:
    line = b"* CAPABILITY IMAP4rev1 IDLE STARTTLS AUTH=XOAUTH2 auth=PLAIN COMPRESS=DEFLATE LITERAL-\r\n"
    out = rewrite_capabilities(line, drop=[b"starttls", b"AUTH=", b"COMPRESS="], add=[b"AUTH=PLAIN", b"IDLE"])
    assert out == b"* CAPABILITY IMAP4rev1 IDLE LITERAL- AUTH=PLAIN\r\n"


def test_rewrite_capability_code_and_other_lines() -> None:
    line = b"A1 OK [CAPABILITY IMAP4rev1 SASL-IR LOGINDISABLED] Logged in"
    assert rewrite_capabilities(line, drop=[b"LOGINDISABLED"]) == b"A1 OK [CAPABILITY IMAP4rev1 SASL-IR] Logged in"
    assert rewrite_capabilities(b"* 1 EXISTS\r\n", drop=[b"IDLE"]) == b"* 1 EXISTS\r\n"


def test_capabilities_of() -> None:
    r1, r2, r3 = feed_all(b"* CAPABILITY IMAP4rev1 idle\r\n* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\nA1 OK x\r\n")
    assert capabilities_of(r1) == {"IMAP4REV1", "IDLE"}
    assert capabilities_of(r2) == {"IMAP4REV1", "SASL-IR"}
    assert capabilities_of(r3) is None


# ---------------------------------------------------------------- properties

_text = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_literal = st.binary(max_size=300)


@st.composite
def response_stream(draw) -> bytes:
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        choice = draw(st.integers(0, 4))
        if choice == 0:
            parts.append(b"A%d %s %s\r\n" % (draw(st.integers(0, 999)), draw(st.sampled_from([b"OK", b"NO", b"BAD"])), draw(_text)))
        elif choice == 1:
            parts.append(b"+ " + draw(_text) + b"\r\n")
        elif choice == 2:
            parts.append(b"* %d EXISTS\r\n" % draw(st.integers(0, 10**6)))
        else:
            wire = b"* %d FETCH (UID 1" % draw(st.integers(1, 99))
            for lit in draw(st.lists(_literal, max_size=3)):
                wire += b" BODY[] {%d}\r\n" % len(lit) + lit
            parts.append(wire + b")\r\n")
    return b"".join(parts)


@settings(max_examples=150)
@given(wire=response_stream(), cuts=st.lists(st.integers(0, 2000), max_size=12), threshold=st.sampled_from([0, 50, 10**6]))
def test_random_splits_give_identical_events(wire: bytes, cuts: list[int], threshold: int) -> None:
    reference = merged(ResponseFramer(literal_stream_threshold=threshold).feed(wire))
    framer = ResponseFramer(literal_stream_threshold=threshold)
    events = []
    for piece in split_at(wire, cuts):
        events += framer.feed(piece)
    assert merged(events) == reference
    assert b"".join(e.raw for e in events) == wire
    assert framer.at_boundary


@settings(max_examples=200)
@given(st.binary(max_size=500), st.integers(1, 64))
def test_random_bytes_only_raise_protocol_error(data: bytes, step: int) -> None:
    framer = ResponseFramer(max_line=128, literal_stream_threshold=16, max_response=256)
    try:
        events = feed_all(data, framer, step=step)
    except ProtocolError:
        return
    joined = b"".join(e.raw for e in events)
    assert data.startswith(joined)


def test_take_unprocessed_returns_partial_response() -> None:
    framer = ResponseFramer()
    events = framer.feed(b"A1 OK done\r\n* 1 FETCH (BODY[] {5}\r\nab")
    assert len(events) == 1
    assert framer.take_unprocessed() == b"* 1 FETCH (BODY[] {5}\r\nab"
    assert framer.at_boundary
    streaming = ResponseFramer(literal_stream_threshold=1)
    streaming.feed(b"* 1 FETCH (BODY[] {5}\r\nab")
    with pytest.raises(ProtocolError):
        streaming.take_unprocessed()
