"""The upstream connection's transport: verified TLS, the TCP connection, reads, the relay handover.

Theory of operation
-------------------
Everything here is about bytes, not IMAP:

* :func:`make_tls_context` builds the client TLS context (system CAs, or only the provider's
  ``ca_file``; TLS 1.2 at least) and caches it per CA file and modification time: building one
  parses every CA certificate, which with the system store took about 200 ms of CPU on the
  benchmark machine -- on the event loop, for every upstream login (docs/performance.md).
* :func:`open_stream` opens the TCP connection (``TCP_NODELAY``) and, for implicit TLS, wraps
  it in a :class:`~gateway.tls.TLSStream` (the handshake is the caller's, under its deadline).
* :func:`receive` is one read of up to :data:`RECEIVE_SIZE` bytes that also takes every whole
  TLS record already decrypted, without waiting (a TLS read returns one 16 KiB record at most).
* :func:`send_within` is a write under a deadline, for IMAP and SMTP alike; so is
  :func:`tls_handshake`, the handshake;
  :func:`tls_failure` turns a failed one into a readable :class:`UpstreamError` (untrusted
  certificate, protocol failure, closed connection).
* :func:`open_client` is the connect sequence both protocol clients share: the stream, the
  client on it and its setup (handshake, greeting, STARTTLS) under one connect deadline,
  the client closed again if the setup fails.
* :class:`DetachedStream` is what the IMAP relay gets after login: the raw stream, whose
  ``aclose`` also frees the account's upstream slot.
"""

from __future__ import annotations

import functools
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from ..errors import UpstreamError
from ..net import take_decrypted
from ..tls import TLSStream
from .proxy import open_tunnel
from .wrapped import WrappedStream

__all__ = [
    "RECEIVE_SIZE",
    "TLS_CONTEXT_CACHE_SIZE",
    "DetachedStream",
    "SlotLike",
    "make_tls_context",
    "more_decrypted",
    "open_client",
    "open_stream",
    "receive",
    "send_within",
    "tls_failure",
    "tls_handshake",
]

#: Bytes asked for per read (a TLS read returns at most one 16 KiB record anyway).
RECEIVE_SIZE = 64 * 1024
#: Distinct upstream CA files whose TLS contexts are kept (one per provider in practice).
TLS_CONTEXT_CACHE_SIZE = 16


class _Closable(Protocol):
    async def aclose(self) -> None: ...


_Client = TypeVar("_Client", bound=_Closable)


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


async def tls_handshake(stream: trio.abc.Stream, timeout: float, where: str) -> None:
    """The TLS handshake of ``stream`` (a ``TLSStream`` or ``trio.SSLStream``) with ``where``
    within ``timeout`` seconds; a timeout or a failure is an :class:`UpstreamError` (see
    :func:`tls_failure`)."""
    assert isinstance(stream, (TLSStream, trio.SSLStream))
    try:
        with trio.fail_after(timeout):
            await stream.do_handshake()
    except trio.TooSlowError:
        raise UpstreamError(f"TLS handshake with {where} timed out") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise tls_failure(exc, where) from None


async def send_within(stream: trio.abc.Stream, data: bytes, timeout: float, where: str) -> None:
    """Write ``data`` to ``stream`` (connected to ``where``) within ``timeout`` seconds; a
    timeout or a lost connection is an :class:`UpstreamError`."""
    try:
        with trio.fail_after(timeout):
            await stream.send_all(data)
    except trio.TooSlowError:
        raise UpstreamError(f"{where} did not accept data within {timeout:g}s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise UpstreamError(f"connection to {where} lost while sending: {exc or type(exc).__name__}") from None


async def open_client(
    host: str,
    port: int,
    *,
    tls: str,
    tls_ctx: ssl.SSLContext,
    proxy: str | None,
    connect_timeout: float,
    make: Callable[[trio.abc.Stream], _Client],
    setup: Callable[[_Client], Awaitable[None]],
) -> _Client:
    """A protocol client on a new connection to ``host:port``: :func:`open_stream` (TLS from
    the start when ``tls`` is ``"implicit"``), ``make`` the client on that stream, then its
    ``setup`` (handshake, greeting, STARTTLS...). All of it within ``connect_timeout``; if
    ``setup`` fails the client is closed."""
    try:
        with trio.fail_after(connect_timeout):
            stream = await open_stream(host, port, tls_ctx if tls == "implicit" else None, proxy=proxy)
            client = make(stream)
            try:
                await setup(client)
            except BaseException:
                await client.aclose()
                raise
    except trio.TooSlowError:
        raise UpstreamError(f"connecting to {host}:{port} took longer than {connect_timeout:g}s") from None
    return client


async def open_stream(
    host: str, port: int, tls_ctx: ssl.SSLContext | None, *, proxy: str | None = None
) -> trio.abc.Stream:
    """TCP to ``host:port`` (``TCP_NODELAY``) -- or, with ``proxy`` (an ``http://`` URL), an
    HTTP CONNECT tunnel through that proxy (:mod:`gateway.upstream.proxy`) -- wrapped in TLS
    when ``tls_ctx`` is given (the handshake is left to the caller). A refused or unreachable
    host (or proxy) is an UpstreamError."""
    tcp: trio.abc.Stream
    if proxy is not None:
        tcp = await open_tunnel(proxy, host, port)
    else:
        try:
            socket_stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        socket_stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tcp = socket_stream
    if tls_ctx is None:
        return tcp
    return wrap_tls(tcp, tls_ctx, host)


def wrap_tls(stream: trio.abc.Stream, tls_ctx: ssl.SSLContext, host: str) -> trio.abc.Stream:
    """Client-side TLS over ``stream``: a :class:`~gateway.tls.TLSStream` on a real socket, a
    ``trio.SSLStream`` over anything else (the proxy's CONNECT tunnel)."""
    if isinstance(stream, trio.SocketStream):
        return TLSStream(stream, tls_ctx, server_hostname=host)
    return trio.SSLStream(stream, tls_ctx, server_hostname=host, https_compatible=False)


def more_decrypted(stream: trio.abc.Stream, data: bytes | bytearray, limit: int = RECEIVE_SIZE) -> bytes | bytearray:
    """``data`` (just read from ``stream``) plus whole TLS records already decrypted, up to
    ``limit`` bytes in all, without waiting."""
    if data and len(data) < limit:
        data += take_decrypted(stream, limit - len(data))
    return data


async def receive(stream: trio.abc.Stream, limit: int = RECEIVE_SIZE) -> bytes | bytearray:
    """One read of up to ``limit`` bytes (``b""`` at EOF), see :func:`more_decrypted`."""
    return more_decrypted(stream, await stream.receive_some(limit), limit)


class DetachedStream(WrappedStream):
    """The upstream byte stream handed to the IMAP relay; ``aclose`` also frees the slot."""

    def __init__(self, stream: trio.abc.Stream, slot: SlotLike | None):
        super().__init__(stream)
        self._slot = slot
        self._takes_records = isinstance(stream, trio.SSLStream)  # a TLSStream takes them itself

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._takes_records:
            return await self._stream.receive_some(max_bytes or RECEIVE_SIZE)
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
