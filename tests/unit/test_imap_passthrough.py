"""Byte-for-byte and property tests of the upstream → client relay scanner."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.imap_passthrough import (
    Bye,
    Continuation,
    ProtocolError,
    ResponseScanner,
    Tagged,
    client_capabilities,
    rewrite_capability_line,
)
from tests.fixtures.splits import split_at


def scan(data: bytes | list[bytes], **kw: int) -> tuple[bytes, list]:
    """Feed ``data`` (one chunk or several); return the relayed bytes and the events."""
    scanner = ResponseScanner(**kw)
    out = bytearray()
    evs = []
    for chunk in [data] if isinstance(data, bytes) else data:
        for item in scanner.feed(chunk):
            if isinstance(item, (bytes, memoryview)):
                out += item
            else:
                evs.append(item)
                out += item.data
    return bytes(out), evs


def test_ordinary_responses_pass_unchanged() -> None:
    data = b"* 3 EXISTS\r\n* 1 FETCH (FLAGS (\\Seen) UID 7)\r\n* LIST (\\HasNoChildren) \"/\" INBOX\r\n"
    assert scan(data) == (data, [])


def test_literals_are_skipped_even_if_they_look_like_responses() -> None:
    body = b"a1 OK fake\r\n* BYE fake\r\n+ fake\r\n* CAPABILITY AUTH=PLAIN\r\n"
    data = b"* 1 FETCH (BODY[] {%d}\r\n" % len(body) + body + b")\r\na1 OK done\r\n"
    out, evs = scan(data)
    assert out == data
    assert evs == [Tagged(b"a1", b"OK", b"a1 OK done\r\n")]


def test_literal8_and_literal_in_continued_line() -> None:
    data = b"* 1 FETCH (BINARY[] ~{3}\r\nabc BODY[1] {2}\r\nxy)\r\nt OK\r\n"
    out, evs = scan(data)
    assert out == data and evs == [Tagged(b"t", b"OK", b"t OK\r\n")]


def test_status_text_ending_in_braces_is_not_a_literal() -> None:
    data = b"t1 NO odd {5}\r\n* OK still {3}\r\nt2 OK\r\n"
    out, evs = scan(data)
    assert out == data
    assert [e.tag for e in evs] == [b"t1", b"t2"]


def test_events() -> None:
    out, evs = scan(b"+ idling\r\n* BYE Autologout\r\nA7 bad junk\r\n")
    assert evs == [Continuation(b"+ idling\r\n"), Bye(b"* BYE Autologout\r\n"), Tagged(b"A7", b"BAD", b"A7 bad junk\r\n")]


def test_capabilities_are_rewritten() -> None:
    data = (
        b"* CAPABILITY IMAP4rev1 AUTH=PLAIN auth=xoauth2 SASL-IR STARTTLS LOGINDISABLED COMPRESS=DEFLATE"
        b" LITERAL- IDLE\r\n"
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS IDLE] hi\r\n"
        b"a OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN MOVE] Logged in\r\n"
    )
    out, evs = scan(data)
    assert out == (
        b"* CAPABILITY IMAP4rev1 IDLE LITERAL+\r\n"
        b"* OK [CAPABILITY IMAP4rev1 IDLE LITERAL+] hi\r\n"
        b"a OK [CAPABILITY IMAP4rev1 MOVE LITERAL+] Logged in\r\n"
    )
    assert evs[0].tag == b"a"


def test_capability_word_in_data_is_not_rewritten() -> None:
    data = b'* LIST () "/" "[CAPABILITY AUTH=PLAIN]"\r\n* 1 FETCH (ENVELOPE ("CAPABILITY STARTTLS"))\r\n'
    assert scan(data)[0] == data


def test_client_capabilities() -> None:
    caps = ["IMAP4rev1", "AUTH=XOAUTH2", "SASL-IR", "COMPRESS=DEFLATE", "LITERAL-", "IDLE", "X-GM-EXT-1"]
    assert client_capabilities(caps) == ["IMAP4rev1", "IDLE", "X-GM-EXT-1", "LITERAL+"]
    assert client_capabilities(["IMAP4rev1", "LITERAL+"]) == ["IMAP4rev1", "LITERAL+"]
    assert rewrite_capability_line(b"* 1 FETCH (FLAGS ())\r\n") == b"* 1 FETCH (FLAGS ())\r\n"


def test_boundary_tracking() -> None:
    s = ResponseScanner()
    assert s.at_boundary
    s.feed(b"* 1 FETCH (BODY[] {4}\r\nab")
    assert not s.at_boundary
    s.feed(b"cd")
    assert not s.at_boundary
    s.feed(b")\r\n* 2 EXI")
    assert not s.at_boundary
    s.feed(b"STS\r\n")
    assert s.at_boundary


def test_long_data_lines_stream_in_pieces() -> None:
    line = b"* SEARCH " + b" ".join(b"%d" % i for i in range(40000)) + b"\r\n"
    chunks = [line[i : i + 16384] for i in range(0, len(line), 16384)] + [b"t OK {3}\r\n"]
    scanner = ResponseScanner(max_line=65536)
    out = bytearray()
    for chunk in chunks:
        for item in scanner.feed(chunk):
            out += item if isinstance(item, (bytes, memoryview)) else item.data
        assert len(scanner._partial) <= 65536 + 16384
    assert bytes(out) == line + b"t OK {3}\r\n"


def test_long_line_with_literal_at_its_end() -> None:
    head = b"* 1 FETCH (X-GM-LABELS (" + b"x" * 100_000 + b") BODY[] {3}\r\n"
    data = head + b"abc)\r\nt OK\r\n"
    out, evs = scan([data[i : i + 4000] for i in range(0, len(data), 4000)], max_line=8192)
    assert out == data and [e.tag for e in evs] == [b"t"]


def test_long_status_line_is_an_error() -> None:
    with pytest.raises(ProtocolError):
        scan([b"t OK " + b"x" * 70000], max_line=65536)
    with pytest.raises(ProtocolError):
        scan([b"* CAPABILITY " + b"x" * 70000], max_line=65536)


# --------------------------------------------------------------------------- properties

_text = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"{", b"("))


@st.composite
def _responses(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["fetch", "tagged", "cont", "caps", "exists", "bye", "search"]))
    if kind == "search":  # a data line long enough to be passed on in pieces
        return b"* SEARCH" + b"".join(b" %d" % n for n in draw(st.lists(st.integers(0, 10**6), max_size=60))) + b"\r\n"
    if kind == "fetch":
        body = draw(st.binary(max_size=200))
        return b"* 1 FETCH (UID 4 BODY[] {%d}\r\n" % len(body) + body + b" FLAGS (\\Seen))\r\n"
    if kind == "tagged":
        return b"t%d OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] " % draw(st.integers(0, 9)) + draw(_text) + b"\r\n"
    if kind == "cont":
        return b"+ " + draw(_text) + b"\r\n"
    if kind == "caps":
        return b"* CAPABILITY IMAP4rev1 STARTTLS IDLE\r\n"
    if kind == "bye":
        return b"* BYE " + draw(_text) + b"\r\n"
    return b"* %d EXISTS\r\n" % draw(st.integers(0, 10**6))


@settings(max_examples=200, deadline=None)
@given(st.lists(_responses(), min_size=1, max_size=8), st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_relays_identically(responses: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(responses)
    whole = scan(stream)
    assert scan(split_at(stream, cuts)) == whole
    assert scan(split_at(stream, cuts), max_line=100) == whole


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=800), st.lists(st.integers(min_value=0), max_size=6))
def test_random_bytes_only_raise_protocol_error(data: bytes, cuts: list[int]) -> None:
    try:
        out, _ = scan(split_at(data, cuts), max_line=128)
    except ProtocolError:
        return
    assert len(out) <= len(data) + 64 * (data.count(b"\n") + 1)
