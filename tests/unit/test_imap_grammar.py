"""The IMAP tokens both directions share: one tag rule, one literal marker, values, mailbox names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol import imap_commands, imap_passthrough, imap_responses
from gateway.protocol.imap_grammar import (
    Atom,
    LiteralMarker,
    ProtocolError,
    ValueParser,
    decode_mailbox,
    encode_mailbox,
    is_tag,
    literal_at_end,
    quote,
)


def test_one_protocol_error_for_both_directions() -> None:
    assert imap_commands.ProtocolError is imap_responses.ProtocolError is imap_passthrough.ProtocolError
    assert issubclass(ProtocolError, ValueError)


@pytest.mark.parametrize("tag", [b"A1", b"x]y", b"]", b"tag.with-dots_and:colons", b"~!#$&'<>?@^`|"])
def test_tags_rfc3501(tag: bytes) -> None:
    assert is_tag(tag)  # "]" is an ASTRING-CHAR (resp-specials), so it may stand in a tag


@pytest.mark.parametrize("tag", [b"", b"+", b"a+b", b"a b", b"a(b", b"a)", b"a{", b"a%", b"a*", b'a"', b"a\\",
                                 b"a\x00", b"a\x7f", b"caf\xc3\xa9"])
def test_not_tags(tag: bytes) -> None:
    assert not is_tag(tag)


def test_a_tag_with_a_bracket_is_read_by_both_directions() -> None:
    reader = imap_commands.CommandReader(max_line=1000, max_literal=1000)
    reader.receive_data(b"a]1 NOOP\r\n")
    event = reader.next_event()
    assert isinstance(event, imap_commands.Command) and event.tag == b"a]1"
    [response] = imap_responses.ResponseFramer().feed(b"a]1 OK done\r\n")
    assert (response.kind, response.tag) == ("tagged", b"a]1")


def test_literal_markers() -> None:
    assert literal_at_end(b"x {5}") == LiteralMarker(start=2, size=5, sync=True, binary=False)
    assert literal_at_end(b"x ~{5+}") == LiteralMarker(start=2, size=5, sync=False, binary=True)
    assert literal_at_end(b"x {5+}", nonsync=False) is None  # a server never sends {n+}
    assert literal_at_end(b"x {5} ") is None and literal_at_end(b"x {}") is None
    with pytest.raises(ProtocolError):
        literal_at_end(b"{99}", max_size=98)


def test_values_in_command_and_response_mode() -> None:
    line = [b'A 12 NIL "q\\"s" (\\Seen \\*) BODY[HEADER.FIELDS (TO)]<0> ', b""]
    assert ValueParser(line, [b"lit"], response=True).parse() == (
        Atom(b"A"), 12, None, b'q"s', (Atom(b"\\Seen"), Atom(b"\\*")), Atom(b"BODY[HEADER.FIELDS (TO)]<0>"), b"lit")
    # Commands keep every atom as it came (a number or NIL is the command's business).
    assert ValueParser([b"12 NIL x[y]"], []).parse() == (Atom(b"12"), Atom(b"NIL"), Atom(b"x[y]"))
    for bad in (b'"open', b"(a", b"a)", b"BODY[x"):
        with pytest.raises(ValueError):
            ValueParser([bad], [], response=True).parse()


def test_multipart_bodystructure_parts_stand_back_to_back() -> None:
    # RFC 3501: body-type-mpart = 1*body SP media-subtype (no space between the parts).
    line = [b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" 3 1)("TEXT" "HTML" NIL NIL NIL "BASE64" 4 1) "MIXED")']
    (structure,) = ValueParser(line, [], response=True).parse()
    assert isinstance(structure, tuple) and len(structure) == 3
    assert structure[0][5] == b"7BIT" and structure[1][5] == b"BASE64" and structure[2] == b"MIXED"
    for bad in (b"(a)b", b'(a)"q"', b"a(b)"):  # only a list may follow a list unspaced
        with pytest.raises(ValueError):
            ValueParser([bad], [], response=True).parse()


def test_quote() -> None:
    assert quote(b'a"b\\c') == b'"a\\"b\\\\c"'
    with pytest.raises(ValueError):
        quote(b"a\r\nb")


def test_mailbox_names_rfc3501_example() -> None:
    assert encode_mailbox("~peter/mail/台北/日本語") == b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert decode_mailbox(b"~peter/mail/&U,BTFw-/&ZeVnLIqe-") == "~peter/mail/台北/日本語"
    assert encode_mailbox("R&D") == b"R&-D" and decode_mailbox(b"R&-D") == "R&D"
    assert decode_mailbox(b"bad&%%%-x") == "bad&%%%-x"  # a broken shift is kept, not an error


@given(st.text())
def test_mailbox_names_roundtrip(name: str) -> None:
    encoded = encode_mailbox(name)
    assert all(0x20 <= b <= 0x7E for b in encoded)
    assert decode_mailbox(encoded) == name
