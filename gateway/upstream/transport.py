"""The upstream connection's transport: verified TLS, the TCP connection, reads, the relay handover.

Theory of operation
-------------------
Everything here is about bytes, not IMAP:

* :func:`make_tls_context` builds the client TLS context (system CAs, or only the provider's
  ``ca_file``; TLS 1.2 at least) and caches it per CA file and modification time: building one
  parses every CA certificate, which with the system store took about 200 ms of CPU on the
  benchmark machine -- on the event loop, for every upstream login (docs/performance.md).
* :func:`open_stream` opens the TCP connection (``TCP_NODELAY``) and, for implicit TLS, wraps
  it in a ``trio.SSLStream`` (the handshake is the caller's, under its deadline).
* :func:`receive` is one read of up to :data:`RECEIVE_SIZE` bytes that also takes every whole
  TLS record already decrypted, without waiting (a TLS read returns one 16 KiB record at most).
* :func:`tls_failure` turns a failed handshake into a readable :class:`UpstreamError`
  (untrusted certificate, protocol failure, closed connection).
* :class:`DetachedStream` is what the IMAP relay gets after login: the raw stream, whose
  ``aclose`` also frees the account's upstream slot.
"""

from __future__ import annotations

import functools
import socket
import ssl
from pathlib import Path
from typing import Protocol

import trio

from ..errors import UpstreamError
from ..net import take_decrypted

__all__ = [
    "RECEIVE_SIZE",
    "TLS_CONTEXT_CACHE_SIZE",
    "DetachedStream",
    "SlotLike",
    "make_tls_context",
    "more_decrypted",
    "open_stream",
    "receive",
    "tls_failure",
]

#: Bytes asked for per read (a TLS read returns at most one 16 KiB record anyway).
RECEIVE_SIZE = 64 * 1024
#: Distinct upstream CA files whose TLS contexts are kept (one per provider in practice).
TLS_CONTEXT_CACHE_SIZE = 16


class SlotLike(Protocol):
    """The account's upstream connection slot (:mod:`gateway.upstream.slots`)."""

    def release(self) -> None: ...


def make_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify the upstream against the system CAs, or only ``ca_file`` when one is set.

    Contexts are shared by every connection with the same CA file (and modification time)."""
    try:
        mtime = ca_file.stat().st_mtime_ns if ca_file else None
    except OSError:
        return _new_tls_context(ca_file)  # raises the usual, clear error
    return _cached_tls_context(ca_file, mtime)


def _new_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@functools.lru_cache(maxsize=TLS_CONTEXT_CACHE_SIZE)
def _cached_tls_context(ca_file: Path | None, mtime: int | None) -> ssl.SSLContext:
    return _new_tls_context(ca_file)


def tls_failure(exc: BaseException, where: str) -> UpstreamError:
    """A readable error for a failed TLS handshake with ``where``."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return UpstreamError(f"TLS certificate of {where} is not trusted: {cause.verify_message}")
    if cause is not None:
        return UpstreamError(f"TLS handshake with {where} failed: {cause.reason or cause}")
    return UpstreamError(f"TLS handshake with {where} failed: connection closed")


async def open_stream(host: str, port: int, tls_ctx: ssl.SSLContext | None) -> trio.abc.Stream:
    """TCP to ``host:port`` (``TCP_NODELAY``), wrapped in TLS when ``tls_ctx`` is given (the
    handshake is left to the caller). A refused or unreachable host is an UpstreamError."""
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise UpstreamError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls_ctx is None:
        return tcp
    return trio.SSLStream(tcp, tls_ctx, server_hostname=host, https_compatible=False)


def more_decrypted(stream: trio.abc.Stream, data: bytes | bytearray, limit: int = RECEIVE_SIZE) -> bytes | bytearray:
    """``data`` (just read from ``stream``) plus whole TLS records already decrypted, up to
    ``limit`` bytes in all, without waiting."""
    if data and len(data) < limit:
        data += take_decrypted(stream, limit - len(data))
    return data


async def receive(stream: trio.abc.Stream, limit: int = RECEIVE_SIZE) -> bytes | bytearray:
    """One read of up to ``limit`` bytes (``b""`` at EOF), see :func:`more_decrypted`."""
    return more_decrypted(stream, await stream.receive_some(limit), limit)


class DetachedStream(trio.abc.Stream):
    """The upstream byte stream handed to the IMAP relay; ``aclose`` also frees the slot."""

    def __init__(self, stream: trio.abc.Stream, slot: SlotLike | None):
        self._stream = stream
        self._slot = slot

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await receive(self._stream, max_bytes or RECEIVE_SIZE)

    def reclaim(self) -> tuple[trio.abc.Stream, SlotLike | None]:
        """The raw stream and the slot, back to the upstream client (the relay handed the
        connection back); this object no longer owns either."""
        stream, slot = self._stream, self._slot
        self._slot = None
        return stream, slot

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._slot is not None:
                self._slot.release()
                self._slot = None
