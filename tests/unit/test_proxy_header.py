"""The PROXY protocol reader (gateway/protocol/proxy_header.py): v1 and v2 as HAProxy sends
them, every malformed form refused, any split parsed the same, random input only raising
ProxyHeaderError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.proxy_header import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    starts_with_proxy_signature,
)
from tests.fixtures.splits import split_at


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


V2_TCP4 = v2(1, 0x11, bytes([192, 0, 2, 7, 10, 0, 0, 1]) + struct.pack("!HH", 51234, 143))
V2_TCP6 = v2(1, 0x21, bytes(15) + b"\x01" + bytes(15) + b"\x02" + struct.pack("!HH", 4000, 993)
             + b"\x04\x00\x03abc")  # a TLV: skipped
V2_LOCAL = v2(0, 0x00, b"")

GOOD = [
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 143\r\n",
     ProxyHeader(1, False, ("192.0.2.7", 51234), ("10.0.0.1", 143))),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 993\r\n",
     ProxyHeader(1, False, ("2001:db8::7", 65535), ("2001:db8::1", 993))),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, False, None, None)),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyHeader(1, False, None, None)),
    (V2_TCP4, ProxyHeader(2, False, ("192.0.2.7", 51234), ("10.0.0.1", 143))),
    (V2_TCP6, ProxyHeader(2, False, ("::1", 4000), ("::2", 993))),
    (V2_LOCAL, ProxyHeader(2, True, None, None)),
    (v2(1, 0x31, bytes(216)), ProxyHeader(2, False, None, None)),  # AF_UNIX: no client
]

BAD = [
    b"a1 LOGIN user pass\r\n",
    b"USER bob\r\n",
    b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
    b"PROXY TCP4 192.0.2.7 10.0.0.1 51234\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 143 extra\r\n",
    b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
    b"PROXY TCP6 192.0.2.7 10.0.0.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 143\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 -1 143\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 +1 143\r\n",
    b"PROXY TCP4  192.0.2.7 10.0.0.1 1 143\r\n",
    b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\n",
    b"PROXY " + b"x" * 120,
    b"PROXY TCP4 192.0.2.\xff 10.0.0.1 1 2\r\n",
    V2_SIGNATURE + bytes([0x10, 0x11, 0, 12]) + bytes(12),  # version 1 in a v2 header
    V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + bytes(12),  # command 2
    v2(1, 0x11, bytes(11)),  # IPv4 block too short
    v2(1, 0x21, bytes(35)),
    V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]),  # 64 KiB: over max_size
]


@pytest.mark.parametrize(("data", "expected"), GOOD)
def test_headers_as_sent_by_haproxy(data: bytes, expected: ProxyHeader) -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(data + b"\x16\x03rest") == expected
    assert reader.rest == b"\x16\x03rest"
    assert starts_with_proxy_signature(data)


@pytest.mark.parametrize("data", BAD)
def test_malformed_headers_are_refused(data: bytes) -> None:
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyHeaderError):
        for i in range(len(data)):  # byte by byte: an error as soon as it is certain
            reader.feed(data[i:i + 1])
        reader.feed(b"\r\n" + bytes(300))


def test_incomplete_header_waits() -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(V2_TCP4[:-1]) is None
    assert reader.feed(b"") is None
    assert reader.feed(V2_TCP4[-1:]) == GOOD[4][1]
    assert reader.rest == b""
    assert reader.feed(b"more") == GOOD[4][1] and reader.rest == b"more"


def test_max_size_is_a_floor_of_the_specification() -> None:
    with pytest.raises(ValueError):
        ProxyHeaderReader(max_size=100)
    body = bytes(12) + b"\x20\x01\x00" + bytes(300)  # a long TLV
    with pytest.raises(ProxyHeaderError, match="over 300"):
        ProxyHeaderReader(max_size=300).feed(v2(1, 0x11, body))
    assert ProxyHeaderReader(max_size=400).feed(v2(1, 0x11, body)) is not None


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(GOOD), st.binary(max_size=50), st.lists(st.integers(0, 400), max_size=8))
def test_any_split_parses_the_same(case: tuple[bytes, ProxyHeader], after: bytes,
                                   cuts: list[int]) -> None:
    data, expected = case
    reader = ProxyHeaderReader()
    results = [reader.feed(piece) for piece in split_at(data + after, cuts)]
    assert results[-1] == expected
    assert reader.rest == after


_PIECES = [V2_SIGNATURE, b"PROXY ", b"TCP4 ", b"TCP6 ", b"UNKNOWN", b"\r\n", b"\n", b" ",
           b"1.2.3.4", b"::1", b"65535", b"99999", b"\x21\x11", b"\x20\x00", b"\x00\x0c",
           b"\xff\xff"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_PIECES), st.binary(max_size=20)), max_size=20),
       st.lists(st.integers(0, 500), max_size=6))
def test_random_input_only_raises_its_error(parts: list[bytes], cuts: list[int]) -> None:
    reader = ProxyHeaderReader(max_size=300)
    data = b"".join(parts)
    try:
        for piece in split_at(data, cuts):
            header = reader.feed(piece)
    except ProxyHeaderError:
        return
    if header is not None:  # what it accepted, it consumed exactly
        assert data.endswith(reader.rest)
        assert len(data) - len(reader.rest) <= 300
