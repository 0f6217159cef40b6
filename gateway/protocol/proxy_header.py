"""The PROXY protocol header (HAProxy's, versions 1 and 2), as a sans-IO reader.

Theory of operation
-------------------
A load balancer in TCP mode (HAProxy ``send-proxy`` / ``send-proxy-v2``) opens its own
connection to mailgate, so the socket's peer is the balancer. It therefore sends, before any byte
of the client's, one header naming the client's address. Rules, from the protocol's
specification (haproxy's ``doc/proxy-protocol.txt``):

1. **Version 1** is one text line: ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` with
   single spaces, or ``PROXY UNKNOWN ...\\r\\n``, 107 bytes at most including the CRLF. An
   address must parse as its family's address, a port is 1 to 5 digits up to 65535.
2. **Version 2** is binary: the 12-byte signature ``\\r\\n\\r\\n\\0\\r\\nQUIT\\n``, one byte of
   version (high nibble, must be 2) and command (low nibble: 0 LOCAL, 1 PROXY), one byte of
   address family and transport, a 16-bit big-endian length, then that many bytes: the
   addresses (12 bytes for TCP over IPv4, 36 for IPv6) and type-length-value extensions, which
   are skipped. A header longer than ``max_size`` is an error.
3. A LOCAL command (the balancer's own health check), an UNKNOWN v1 line and a v2 family other
   than TCP over IPv4/IPv6 carry no client: :attr:`ProxyHeader.source` is ``None`` and the
   caller keeps the socket's peer.
4. The reader consumes exactly the header: bytes fed after it are the client's and are
   returned by :attr:`ProxyHeaderReader.rest`. Any split of the input gives the same result.
5. Anything else -- bytes that cannot begin either signature, a malformed field, an oversized
   header -- raises :class:`ProxyHeaderError`, and the connection must be closed: there is no
   way to resynchronise.

:func:`starts_with_proxy_signature` tells whether some bytes begin with a complete v1 or v2
signature, for refusing a header sent by a peer that is not allowed to send one.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "MAX_V1_LENGTH",
    "MIN_V2_CAPACITY",
    "V1_SIGNATURE",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "starts_with_proxy_signature",
]

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1_LENGTH = 107
V2_FIXED = 16  # signature, version/command, family, length
#: The largest address block of version 2 (two AF_UNIX paths): a reader must accept at least
#: this much after the fixed part.
MIN_V2_CAPACITY = V2_FIXED + 216

#: Family/transport byte → address block layout: TCP over IPv4 (0x11) and over IPv6 (0x21).
_V2_TCP: dict[int, tuple[str, type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]]] = {
    0x11: ("!4s4sHH", ipaddress.IPv4Address),
    0x21: ("!16s16sHH", ipaddress.IPv6Address),
}


class ProxyHeaderError(Exception):
    """The bytes are not a valid PROXY protocol header (the connection must be closed)."""


@dataclass(frozen=True)
class ProxyHeader:
    version: int  # 1 or 2
    local: bool  # v2 LOCAL: the balancer speaking for itself (health checks)
    source: tuple[str, int] | None  # the client; None: use the socket's peer
    destination: tuple[str, int] | None


class ProxyHeaderReader:
    """Feed bytes with :meth:`feed` until it returns the header (rule 4: exactly consumed)."""

    def __init__(self, *, max_size: int = 4096):
        if max_size < MIN_V2_CAPACITY:
            raise ValueError(f"max_size must be at least {MIN_V2_CAPACITY}")
        self._max_size = max_size
        self._buffer = bytearray()
        self._header: ProxyHeader | None = None
        self._rest = b""

    @property
    def rest(self) -> bytes:
        """The bytes fed after the header (the client's first bytes); empty before it."""
        return self._rest

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add bytes; the header once complete (then again on every later call), else None.
        Raises :class:`ProxyHeaderError`."""
        if self._header is not None:
            self._rest += data
            return self._header
        self._buffer += data
        header, used = self._parse(bytes(self._buffer))
        if header is not None:
            self._header, self._rest = header, bytes(self._buffer[used:])
            self._buffer.clear()
        return header

    def _parse(self, buf: bytes) -> tuple[ProxyHeader | None, int]:
        if buf.startswith(V2_SIGNATURE):
            return self._parse_v2(buf)
        if buf.startswith(V1_SIGNATURE):
            return _parse_v1(buf)
        if V2_SIGNATURE.startswith(buf) or V1_SIGNATURE.startswith(buf):
            return None, 0
        raise ProxyHeaderError("the connection does not start with a PROXY protocol header")

    def _parse_v2(self, buf: bytes) -> tuple[ProxyHeader | None, int]:
        if len(buf) < V2_FIXED:
            return None, 0
        ver_cmd, family, length = struct.unpack_from("!BBH", buf, 12)
        if ver_cmd >> 4 != 2:
            raise ProxyHeaderError(f"PROXY v2: unsupported version {ver_cmd >> 4}")
        command = ver_cmd & 0x0F
        if command not in (0, 1):
            raise ProxyHeaderError(f"PROXY v2: unknown command {command}")
        total = V2_FIXED + length
        if total > self._max_size:
            raise ProxyHeaderError(f"PROXY v2: header of {total} bytes is over {self._max_size}")
        if len(buf) < total:
            return None, 0
        body = buf[V2_FIXED:total]
        if command == 0:
            return ProxyHeader(2, True, None, None), total
        block = _V2_TCP.get(family)
        if block is None:
            return ProxyHeader(2, False, None, None), total  # UNSPEC, UNIX or datagram: rule 3
        layout, kind = block
        if length < struct.calcsize(layout):
            raise ProxyHeaderError(f"PROXY v2: {kind.__name__} address block too short")
        src, dst, sport, dport = struct.unpack_from(layout, body)
        return ProxyHeader(2, False, (str(kind(src)), sport), (str(kind(dst)), dport)), total


def _parse_v1(buf: bytes) -> tuple[ProxyHeader | None, int]:
    end = buf.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        if len(buf) >= MAX_V1_LENGTH or b"\n" in buf:
            raise ProxyHeaderError("PROXY v1: no CRLF within 107 bytes")
        return None, 0
    try:
        line = buf[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1: not ASCII") from None
    fields = line.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(1, False, None, None), end + 2
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("PROXY v1: expected 'PROXY TCP4|TCP6 src dst sport dport'")
    kind = ipaddress.IPv4Address if fields[1] == "TCP4" else ipaddress.IPv6Address
    try:
        src, dst = kind(fields[2]), kind(fields[3])
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1: not {fields[1]} addresses") from None
    sport, dport = _port(fields[4]), _port(fields[5])
    return ProxyHeader(1, False, (str(src), sport), (str(dst), dport)), end + 2


def _port(text: str) -> int:
    if not (1 <= len(text) <= 5 and text.isascii() and text.isdigit()) or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1: bad port {text!r}")
    return int(text)


def starts_with_proxy_signature(data: bytes) -> bool:
    """True if ``data`` begins with a whole v1 (``PROXY ``) or v2 signature."""
    return data.startswith(V1_SIGNATURE) or data.startswith(V2_SIGNATURE)
