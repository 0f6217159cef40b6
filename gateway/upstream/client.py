"""The upstream IMAP client: one authenticated connection to the provider's IMAP server.

Theory of operation
-------------------
This module assembles the client from its four parts and opens connections:

* :mod:`gateway.upstream.transport` -- bytes: the cached, verifying TLS context, the TCP/TLS
  stream, reads that take every decrypted TLS record at once, and the :class:`DetachedStream`
  the IMAP relay gets after login;
* :mod:`gateway.upstream.engine` -- the command engine: tags, one command at a time, tagged
  answers (:class:`UpstreamResponse`, :class:`CommandFailed`), capabilities, STARTTLS,
  ``AUTHENTICATE`` for OAuth, LOGOUT, ``detach``;
* :mod:`gateway.upstream.mailbox` -- :class:`UpstreamIMAP`: the engine plus the POP3-shaped
  mailbox operations (select, sizes, store, exact expunge, move, special-use lookup);
* :mod:`gateway.upstream.body` -- :class:`BodyStream`, one message body streamed chunk by chunk.

Server responses are read by the one response reader,
:mod:`gateway.protocol.imap_responses` (framed mode).

:func:`connect` opens a verified TLS connection (implicit or STARTTLS), reads the greeting and
learns the capabilities; connecting, TLS and the greeting share ``connect_timeout``. Logging in
is :mod:`gateway.upstream.login`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from .body import BodyStream, MessageVanished
from .engine import CommandFailed, UpstreamBad, UpstreamNo, UpstreamResponse
from .mailbox import MailboxInfo, UnsafeExpunge, UpstreamIMAP, quote_mailbox, uid_set
from .transport import RECEIVE_SIZE, DetachedStream, make_tls_context, open_client

log = logging.getLogger("mailgate.upstream")

__all__ = [
    "RECEIVE_SIZE",
    "BodyStream",
    "CommandFailed",
    "DetachedStream",
    "MailboxInfo",
    "MessageVanished",
    "UnsafeExpunge",
    "UpstreamBad",
    "UpstreamIMAP",
    "UpstreamNo",
    "UpstreamResponse",
    "connect",
    "make_tls_context",
    "quote_mailbox",
    "uid_set",
]


async def connect(
    host: str,
    port: int,
    *,
    tls: str = "implicit",
    ca_file: Path | None = None,
    connect_timeout: float,
    command_timeout: float,
    max_line: int = 65536,
    proxy: str | None = None,
) -> UpstreamIMAP:
    """Open a verified TLS connection (``implicit`` or ``starttls``), read the greeting and
    learn the capabilities. Everything up to here shares ``connect_timeout``. With ``proxy``
    (an ``http://`` URL) the TCP connection is a CONNECT tunnel through that proxy."""
    where = f"{host}:{port}"
    tls_ctx = make_tls_context(ca_file)

    def make(stream: trio.abc.Stream) -> UpstreamIMAP:
        return UpstreamIMAP(stream, where=where, command_timeout=command_timeout, max_line=max_line)

    async def setup(client: UpstreamIMAP) -> None:
        if tls == "implicit":
            await client.handshake()
        await client.read_greeting()
        if tls == "starttls":
            await client.starttls(tls_ctx, host)
        elif not client.capabilities:
            await client.refresh_capabilities()

    client = await open_client(host, port, tls=tls, tls_ctx=tls_ctx, proxy=proxy,
                               connect_timeout=connect_timeout, make=make, setup=setup)
    log.debug("connected to %s (%s)", where, tls)
    return client
