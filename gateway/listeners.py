"""Listening sockets, shareable by several worker processes (``SO_REUSEPORT``).

Theory of operation
-------------------
With ``[server] workers = 1`` a listener is what :func:`trio.open_tcp_listeners` makes, as
always. With more workers every worker process opens its *own* listening sockets on the same
address with ``SO_REUSEPORT`` set, and the kernel spreads incoming connections over them (a hash
of the connection's addresses): no process accepts for another, and a worker that dies takes
only its own accept queue with it.

Port 0 ("any free port", used by tests) cannot be shared that way -- each worker would get a
different port -- so the supervisor first :func:`reserve` s a concrete port for each such
listener: a bound, non-listening ``SO_REUSEPORT`` socket it keeps while workers run (the kernel
never hands a connection to a socket that is not listening), and gives the workers a
configuration naming that port.
"""

from __future__ import annotations

import socket

import trio

__all__ = ["open_listeners", "reserve"]

BACKLOG = 4096  # trio's default backlog cap (the kernel clamps it to somaxconn)


async def open_listeners(host: str, port: int, *, reuse_port: bool) -> list[trio.SocketListener]:
    """Listening sockets for ``host:port``; with ``reuse_port``, shareable across processes."""
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host)
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                          flags=socket.AI_PASSIVE)
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _, sockaddr in infos:
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    return listeners


def reserve(host: str) -> socket.socket:
    """A bound, non-listening ``SO_REUSEPORT`` socket on a free port of ``host`` (blocking)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock
