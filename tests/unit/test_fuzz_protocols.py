"""Property tests of the sans-IO parsers from the attacker's side (complementing each protocol
engineer's own): bounded memory whatever the input, byte-exact relaying, differential checks
against small reference models, and "random input only raises the module's own error".

CI runs a modest number of examples; ``bench/fuzz.py`` runs the same properties with as many as
asked (``MAILGATE_FUZZ_EXAMPLES``), see docs/security.md.
"""

from __future__ import annotations

import base64
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.protocol import imap_commands, imap_passthrough, imap_responses, pop3, sasl

#: Examples per property; bench/fuzz.py raises it for long runs.
EXAMPLES = int(os.environ.get("MAILGATE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Bytes that matter to the framers, mixed into random input so that it reaches deep states.
_INTERESTING = [b"\r\n", b"\n", b"\r", b"{", b"}", b"+}", b"~{", b"{0}\r\n", b"{5}\r\n",
                b"{4097+}\r\n", b"{99999999999}\r\n", b'"', b"\\", b"(", b")", b"[", b"]",
                b" ", b"*", b"+ ", b"a1 ", b"OK", b"BYE", b"CAPABILITY", b"LOGIN", b"IDLE",
                b"DONE", b"AUTHENTICATE", b"\x00", b".", b"..", b"\r\n.\r\n"]
protocolish = st.lists(
    st.one_of(st.sampled_from(_INTERESTING), st.binary(max_size=40)), max_size=60
).map(b"".join)
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=10)


def split(data: bytes, positions: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in positions})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


# --- IMAP, client side: memory stays bounded, only ProtocolError -----------------------------

MAX_LINE, MAX_LITERAL = 256, 512


@FUZZ
@given(protocolish, cuts)
def test_command_reader_memory_is_bounded(data: bytes, positions: list[int]) -> None:
    reader = imap_commands.CommandReader(max_line=MAX_LINE, max_literal=MAX_LITERAL)
    try:
        for piece in split(data, positions):
            reader.receive_data(piece)
            while (event := reader.next_event()) is not imap_commands.NEED_DATA:
                if isinstance(event, imap_commands.Command):
                    assert len(event.tag) <= MAX_LINE
            # Whatever a client sends, the reader holds no more than one bounded command.
            assert reader.buffered <= MAX_LINE + MAX_LITERAL + len(piece)
    except imap_commands.ProtocolError:
        pass


@FUZZ
@given(protocolish, cuts, st.sampled_from([None, 0, 4096]))
def test_command_relay_never_holds_a_literal(data: bytes, positions: list[int],
                                             nonsync: int | None) -> None:
    """After login literals may be 100 MB: the relay streams them, holding at most one line."""
    relay = imap_commands.CommandRelay(max_line=MAX_LINE, max_literal=10**9,
                                       nonsync_literal_limit=nonsync)
    forwarded = 0
    try:
        for piece in split(data, positions):
            relay.receive_data(piece)
            while (event := relay.next_event()) is not imap_commands.NEED_DATA:
                if isinstance(event, imap_commands.Forward):
                    forwarded += len(event.data)
                elif isinstance(event, imap_commands.AwaitContinuation):
                    relay.state.continuation()
            assert len(relay._buf.data) < MAX_LINE + len(piece)
    except imap_commands.ProtocolError:
        return
    assert forwarded <= len(data) + 64  # a rewritten {n+} → {n} may only shorten or keep


# --- IMAP, upstream side: the relay is byte-exact ---------------------------------------------

_tag = st.from_regex(rb"\A[A-Za-z][A-Za-z0-9.\]]{0,5}\Z")  # "]" may stand in a tag (RFC 3501)
_text = st.from_regex(rb"\A[ -~]{0,40}\Z").filter(lambda t: b"{" not in t and b"[" not in t)


@st.composite
def upstream_responses(draw: st.DrawFn) -> bytes:
    """Untagged data with literals (any octets), continuations and tagged completions; no
    capability lines (those are rewritten on purpose)."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["fetch", "data", "cont", "tagged", "exists"]))
        if kind == "fetch":
            body = draw(st.binary(max_size=300))
            out.append(b"* %d FETCH (UID %d BODY[] {%d}\r\n" % (
                draw(st.integers(1, 99)), draw(st.integers(1, 999)), len(body)) + body + b")\r\n")
        elif kind == "data":
            out.append(b"* SEARCH " + b" ".join(b"%d" % n for n in draw(
                st.lists(st.integers(1, 10**6), max_size=8))) + b"\r\n")
        elif kind == "cont":
            out.append(b"+ " + draw(_text) + b"\r\n")
        elif kind == "exists":
            out.append(b"* %d EXISTS\r\n" % draw(st.integers(0, 10**6)))
        else:
            out.append(draw(_tag) + b" " + draw(st.sampled_from([b"OK", b"NO", b"BAD"])) + b" "
                       + draw(_text) + b"\r\n")
    return b"".join(out)


def _relayed(items: list[imap_passthrough.Item]) -> bytes:
    out = bytearray()
    for item in items:
        if isinstance(item, (bytes, memoryview)):
            out += item
        else:
            out += item.data
    return bytes(out)


@FUZZ
@given(upstream_responses(), cuts)
def test_response_scanner_relays_byte_for_byte(wire: bytes, positions: list[int]) -> None:
    scanner = imap_passthrough.ResponseScanner(max_line=1024)
    relayed = bytearray()
    for piece in split(wire, positions):
        relayed += _relayed(scanner.feed(piece))
    assert bytes(relayed) == wire
    assert scanner.at_boundary


@FUZZ
@given(protocolish, cuts)
def test_response_scanner_random_input(data: bytes, positions: list[int]) -> None:
    scanner = imap_passthrough.ResponseScanner(max_line=128)
    try:
        for piece in split(data, positions):
            scanner.feed(piece)
            assert len(scanner._partial) <= 128 + 64  # a line is never held beyond the limit
    except imap_passthrough.ProtocolError:
        pass


@FUZZ
@given(upstream_responses(), cuts, st.sampled_from([16, 64 * 1024]))
def test_response_framer_is_byte_exact_and_gives_every_literal_back(
    wire: bytes, positions: list[int], threshold: int
) -> None:
    framer = imap_responses.ResponseFramer(literal_stream_threshold=threshold)
    raw = bytearray()
    bodies: list[bytes] = []
    current = bytearray()
    for piece in split(wire, positions):
        for event in framer.feed(piece):
            raw += event.raw
            if isinstance(event, imap_responses.LiteralStart):
                current = bytearray()
            elif isinstance(event, imap_responses.LiteralChunk):
                current += event.data
            elif isinstance(event, imap_responses.LiteralEnd):
                bodies.append(bytes(current))
            elif isinstance(event, imap_responses.Response):
                bodies += [lit for i, lit in enumerate(event.literals)
                           if lit is not None and i not in event.streamed_literals]
    assert bytes(raw) == wire
    assert bodies == _literals(wire)
    assert framer.at_boundary


def _literals(wire: bytes) -> list[bytes]:
    out, pos = [], 0
    pattern = re.compile(rb"BODY\[\] \{(\d+)\}\r\n")
    while (m := pattern.search(wire, pos)) is not None:
        size = int(m.group(1))
        out.append(wire[m.end(): m.end() + size])
        pos = m.end() + size
    return out


@FUZZ
@given(protocolish, cuts)
def test_response_framer_random_input_only_raises_protocol_error(data: bytes,
                                                                 positions: list[int]) -> None:
    framer = imap_responses.ResponseFramer()
    try:
        for piece in split(data, positions):
            framer.feed(piece)
    except imap_responses.ProtocolError:
        pass


@FUZZ
@given(upstream_responses(), cuts)
def test_both_reader_modes_see_the_same_tagged_answers(wire: bytes, positions: list[int]) -> None:
    """One grammar: the relay mode and the framed mode agree on where responses are."""
    scanner = imap_passthrough.ResponseScanner(max_line=1024)
    framer = imap_responses.ResponseFramer(literal_stream_threshold=16)
    relayed, framed = [], []
    for piece in split(wire, positions):
        relayed += [(i.tag, i.status) for i in scanner.feed(piece) if isinstance(i, imap_responses.Tagged)]
        framed += [(e.tag, e.keyword) for e in framer.feed(piece)
                   if isinstance(e, imap_responses.Response) and e.kind == "tagged"]
    assert relayed == framed


@FUZZ
@given(protocolish)
def test_response_data_parse_only_raises_value_error(data: bytes) -> None:
    try:
        events = imap_responses.ResponseFramer().feed(b"* 1 FETCH " + data.replace(b"\n", b"") + b"\r\n")
    except imap_responses.ProtocolError:
        return
    for event in events:
        if isinstance(event, imap_responses.Response):
            for parse in (event.values, event.fetch):
                try:
                    parse()
                except ValueError:
                    pass


# --- POP3 ---------------------------------------------------------------------------------------


@FUZZ
@given(protocolish, cuts, st.sampled_from([pop3.MAX_COMMAND_LINE, pop3.MAX_SASL_LINE]))
def test_pop3_line_reader_is_split_invariant_and_bounded(data: bytes, positions: list[int],
                                                         limit: int) -> None:
    def read(pieces: list[bytes]) -> list[bytes | str]:
        reader = pop3.LineReader(limit)
        out: list[bytes | str] = []
        for piece in pieces:
            reader.feed(piece)
            while True:
                try:
                    line = reader.next_line()
                except pop3.LineTooLong:
                    out.append("too long")
                    continue
                if line is None:
                    break
                assert len(line) < limit
                out.append(line)
            assert reader.buffered < limit + len(piece)
        return out

    whole = read([data])
    # Line boundaries do not depend on how the bytes arrived (an overlong line may be reported
    # as soon as the limit is reached, so "too long" is compared as one event per line).
    assert [x for x in read(split(data, positions)) if x != "too long"] == \
        [x for x in whole if x != "too long"]


_states = st.sampled_from(["authorization", "user_given", "transaction"])


def _session(state: str) -> pop3.SessionState:
    session = pop3.SessionState()
    if state == "user_given":
        session.user_accepted("alice")
    elif state == "transaction":
        session.user_accepted("alice")
        session.logged_in()
    return session


@FUZZ
@given(st.binary(max_size=300) | protocolish, _states)
def test_pop3_parse_command_only_rejects(line: bytes, state: str) -> None:
    try:
        command = pop3.parse_command(line, _session(state))
    except pop3.ProtocolError:
        return
    assert command.name.isupper() and len(command.name) <= 8


@FUZZ
@given(st.sampled_from(["RETR", "DELE", "LIST", "UIDL"]), st.integers(0, 2**40),
       st.sampled_from([b" ", b"  ", b"\t"]), st.booleans())
def test_pop3_message_numbers_are_range_checked(name: str, n: int, sep: bytes, lower: bool) -> None:
    word = name.lower() if lower else name
    line = word.encode() + sep + str(n).encode()
    try:
        command = pop3.parse_command(line, _session("transaction"))
    except pop3.CommandRejected:
        assert n < 1 or n > pop3.MAX_NUMBER or sep != b" "
        return
    assert 1 <= command.msg <= pop3.MAX_NUMBER


def reference_pop3_body(message: bytes, top: int | None = None) -> bytes:
    """What the multi-line body must be, computed the slow obvious way (Dovecot's rules as
    gateway.protocol.pop3 documents them)."""
    text = re.sub(rb"(?<!\r)\n", b"\r\n", message)
    if top is not None:  # the header, its blank line, then ``top`` body lines
        if text.startswith(b"\r\n"):
            cut = 2  # an empty header
        else:
            blank = text.find(b"\r\n\r\n")
            cut = blank + 4 if blank >= 0 else len(text)
        body_lines = re.findall(rb"[^\n]*\n|[^\n]+\Z", text[cut:])
        text = text[:cut] + b"".join(body_lines[:top])
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    stuffed = re.sub(rb"(^|\n)\.", rb"\1..", text)
    return stuffed + b".\r\n"


_message = st.lists(st.one_of(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.\r\n",
                                                b"Subject: x\r\n", b"\r\n\r\n"]),
                              st.binary(max_size=30)), max_size=40).map(b"".join)


def _encode(message: bytes, positions: list[int], top: int | None) -> bytes:
    encoder = pop3.MessageEncoder(top)
    out = bytearray()
    for piece in split(message, positions):
        out += encoder.feed(piece)
        if encoder.done:
            break
    out += encoder.finish()
    return bytes(out)


@FUZZ
@given(_message, cuts)
def test_pop3_retr_matches_the_reference_model(message: bytes, positions: list[int]) -> None:
    assert _encode(message, positions, None) == reference_pop3_body(message)


@FUZZ
@given(_message, cuts, st.integers(0, 6))
def test_pop3_top_is_split_invariant(message: bytes, positions: list[int], k: int) -> None:
    assert _encode(message, positions, k) == _encode(message, [], k)


@FUZZ
@given(_message, st.integers(0, 6))
def test_pop3_top_matches_the_reference_model(message: bytes, k: int) -> None:
    assert _encode(message, [], k) == reference_pop3_body(message, k)


# --- SASL decoders --------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200))
def test_sasl_decoders_only_raise_their_own_errors(raw: bytes) -> None:
    b64 = base64.b64encode(raw)
    for candidate in (raw, b64, b64[:-1], b64 + b"=", b"=" + b64):
        for decode in (sasl.decode_plain, sasl.decode_login_step, sasl.decode_oauth_error):
            try:
                decode(candidate)
            except sasl.SASLError:
                pass
