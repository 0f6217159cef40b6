"""Upstream connections through an HTTP ``CONNECT`` proxy (``upstream_proxy``).

Theory of operation
-------------------
:func:`open_tunnel` is what the upstream TCP connect calls instead of
``trio.open_tcp_stream(host, port)`` when the provider has an ``upstream_proxy`` (by default
``[network] upstream_proxy``):

1. TCP to the proxy (``TCP_NODELAY``, like a direct upstream connection);
2. the ``CONNECT host:port`` exchange of :mod:`gateway.protocol.http_connect` (Basic
   credentials from the proxy URL), reading at most the answer's header block;
3. on 2xx the connection *is* the tunnel: the caller does TLS (implicit or STARTTLS) with the
   upstream inside it, verified against the upstream's name as always. Bytes the proxy sent
   after its answer are replayed first (:class:`_Replay`).

Every failure is an :class:`~gateway.errors.UpstreamError` that names the proxy (never its
credentials) and what it said: unreachable, "wants credentials" (407), "refused the tunnel"
(403, 502, ...), or not speaking HTTP. The caller's connect deadline covers all of it.
"""

from __future__ import annotations

import socket

import trio

from ..errors import UpstreamError
from ..protocol.http_connect import ConnectHandshake, ProxyProtocolError, parse_proxy_url
from .wrapped import WrappedStream

__all__ = ["open_tunnel"]

RECEIVE_SIZE = 4096


async def open_tunnel(proxy_url: str, host: str, port: int) -> trio.abc.Stream:
    """A stream to ``host:port`` through the HTTP proxy ``proxy_url`` (see the module doc)."""
    try:
        proxy = parse_proxy_url(proxy_url)
    except ValueError as exc:
        raise UpstreamError(f"upstream_proxy: {exc}") from None
    handshake = ConnectHandshake(proxy, host, port)
    target = handshake.target
    try:
        tcp = await trio.open_tcp_stream(proxy.host, proxy.port)
    except OSError as exc:
        raise UpstreamError(
            f"cannot connect to proxy {proxy.where} (for {target}): {exc.strerror or exc}"
        ) from None
    try:
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await tcp.send_all(handshake.request())
        while True:
            data = await tcp.receive_some(RECEIVE_SIZE)
            answer = handshake.feed(data)
            if answer is not None:
                break
    except ProxyProtocolError as exc:
        await tcp.aclose()
        raise UpstreamError(str(exc)) from None
    except (OSError, trio.BrokenResourceError) as exc:
        await tcp.aclose()
        raise UpstreamError(f"proxy {proxy.where} failed during CONNECT {target}: {exc}") from None
    except BaseException:
        await tcp.aclose()
        raise
    if not answer.ok:
        await tcp.aclose()
        said = f"{answer.status} {answer.reason}".strip()
        if answer.wants_credentials:
            raise UpstreamError(
                f"proxy {proxy.where} wants credentials to reach {target} ({said}): "
                "put them in upstream_proxy (http://user:password@proxy:port)"
            )
        raise UpstreamError(f"proxy {proxy.where} refused the tunnel to {target} ({said})")
    if answer.leftover:
        return _Replay(tcp, answer.leftover)
    return tcp


class _Replay(WrappedStream):
    """A stream that first returns bytes already read from it."""

    def __init__(self, inner: trio.abc.Stream, pending: bytes):
        super().__init__(inner)
        self._pending = pending

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._pending:
            size = len(self._pending) if max_bytes is None else max_bytes
            data, self._pending = self._pending[:size], self._pending[size:]
            return data
        return await self._stream.receive_some(max_bytes)
