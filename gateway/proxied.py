"""Who the client is on a listener behind a load balancer: the PROXY protocol at accept.

Theory of operation
-------------------
A listener's ``proxy_protocol_from`` names the networks of its load balancers. Rules, applied by
:func:`client_address` to every accepted connection before TLS or the greeting:

1. Listener without ``proxy_protocol_from``: nothing changes; the socket's peer is the client.
2. Peer inside ``proxy_protocol_from``: it *must* send a PROXY header (v1 or v2,
   :mod:`gateway.protocol.proxy_header`) within ``limits.proxy_header_timeout`` seconds and
   ``limits.max_proxy_header`` bytes. The header's source becomes the client address that
   per-IP limits, login throttling, ``plaintext_auth_from``, the session log and the status
   page see. A LOCAL or UNKNOWN header (a health check) keeps the socket's peer. No header, a
   late one or a malformed one: the connection is closed without a greeting (logged).
3. Peer outside ``proxy_protocol_from``: the socket's peer is the client, and a PROXY header
   from it is refused: if the first bytes it sends begin with a PROXY signature, the
   connection is closed (logged) instead of letting the bytes reach the protocol. On an
   implicit-TLS listener such bytes already fail the handshake.

The header is read with ordinary receives; bytes that arrived after it (a client's TLS
ClientHello, say) are handed back first by :class:`ListenerStream`, which otherwise only
delegates. Connections under rule 1, and rule-2 connections with nothing read past the header,
keep the bare socket stream: no extra layer on the data path.
"""

from __future__ import annotations

import logging

import trio

from .config import Limits, ListenerConfig, in_networks
from .protocol.proxy_header import ProxyHeaderError, ProxyHeaderReader, starts_with_proxy_signature

log = logging.getLogger("mailgate.server")

__all__ = ["ListenerStream", "client_address"]


class ListenerStream(trio.abc.Stream):
    """The accepted stream with bytes already read handed back first (rule 2), or screening
    the first bytes for a forged PROXY header (rule 3)."""

    def __init__(self, inner: trio.SocketStream, *, prefix: bytes = b"", screen: bool = False,
                 peer: str = ""):
        self._inner = inner
        self._prefix = prefix
        self._screen = screen
        self._peer = peer

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data = self._prefix if max_bytes is None else self._prefix[:max_bytes]
            self._prefix = self._prefix[len(data):]
            return data
        received = await self._inner.receive_some(max_bytes)
        data = received if isinstance(received, bytes) else bytes(received)
        if self._screen:
            self._screen = False
            if starts_with_proxy_signature(data):
                log.warning("refused a PROXY protocol header from %s: not in the listener's "
                            "proxy_protocol_from", self._peer)
                await trio.aclose_forcefully(self._inner)
                raise trio.BrokenResourceError("PROXY header from an untrusted peer")
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()


async def client_address(
    raw: trio.SocketStream, peer: tuple[str, int], lst: ListenerConfig, limits: Limits
) -> tuple[trio.abc.Stream, tuple[str, int]] | None:
    """The stream to serve and the client's address, by the rules of the module docstring;
    None when the connection must be closed (rule 2's failures, already logged)."""
    if not lst.proxy_protocol_from:
        return raw, peer
    if not in_networks(peer[0], lst.proxy_protocol_from):
        if lst.tls == "implicit":
            return raw, peer
        return ListenerStream(raw, screen=True, peer=f"{peer[0]}:{peer[1]}"), peer
    reader = ProxyHeaderReader(max_size=limits.max_proxy_header)
    header = None
    try:
        with trio.fail_after(limits.proxy_header_timeout):
            while header is None:
                data = await raw.receive_some(limits.max_proxy_header)
                if not data:
                    log.info("%s:%s closed before its PROXY header", *peer)
                    return None
                header = reader.feed(data)
    except trio.TooSlowError:
        log.warning("no PROXY header from %s:%s within %ss: closed", *peer,
                    limits.proxy_header_timeout)
        return None
    except ProxyHeaderError as exc:
        log.warning("bad PROXY header from %s:%s: %s: closed", *peer, exc)
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    client = header.source or peer
    stream: trio.abc.Stream = ListenerStream(raw, prefix=reader.rest) if reader.rest else raw
    return stream, client
