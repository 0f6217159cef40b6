"""The client connection as the front ends see it: a trio stream, its peer and its TLS state.

Theory of operation
-------------------
:class:`ClientStream` is deliberately thin. It does *not* buffer: front ends feed whatever
``receive_some`` returns into their sans-IO parser, and the parser owns the buffer. That is what
makes STARTTLS safe (the CVE-2011-0411 class of bugs): when a client sends ``STARTTLS`` and, in the
same packet, more commands, those bytes sit in the *parser*; the front end discards them
(``parser.discard_buffer()``) before calling :meth:`ClientStream.start_tls`. Bytes still in the
kernel after that are read by the TLS layer as handshake data and make the handshake fail: they
are never executed as commands.

``receive_some`` maps a peer that vanished (TCP reset, TLS without close_notify) to end-of-file,
because for a front end both mean the same thing: the client is gone, end the session without
touching the mailbox. ``send_all`` lets ``trio.BrokenResourceError`` through, so a front end
writing into a dead connection stops at once.

Every TLS handshake runs under ``limits.tls_handshake_timeout``: a client that opens a connection
and never finishes the handshake does not hold a slot for long.
"""

from __future__ import annotations

import ssl
import time

import trio

from .config import ListenerConfig, in_networks
from .tls import TLSStream

RECEIVE_SIZE = 65536  # SSLStream returns at most one 16 KiB record per call; plain TCP more.


def take_decrypted(stream: trio.abc.Stream, limit: int) -> bytes:
    """Bytes a TLS stream can return *now*, without waiting: call right after a receive.

    ``trio.SSLStream.receive_some`` returns at most one TLS record per call, and some servers
    (Dovecot) write 4 KiB records: relaying a 20 MB message would cost ~5,000 trips through the
    scheduler. trio reads up to 32 KiB of ciphertext per refill, so after one record is returned
    several more are usually sitting complete in the stream's incoming buffer; this takes them
    synchronously (one scheduler trip per refill instead of per record). It reads through the
    stream's SSLObject (a private attribute of trio's SSLStream, pinned with trio): a partial
    record raises SSLWantReadError and stays for trio's next read; anything else stops here and
    is seen by trio's next read as usual.
    """
    # (An exact type check: this runs once per read, and isinstance of an ABC is not free.)
    obj = getattr(stream, "_ssl_object", None) if type(stream) is trio.SSLStream else None
    if obj is None or limit <= 0:
        return b""
    parts = []
    while limit > 0:
        try:
            chunk = obj.read(limit)
        except ssl.SSLError:  # SSLWantReadError: no complete record buffered (the usual end)
            break
        if not chunk:
            break
        parts.append(chunk)
        limit -= len(chunk)
    return b"".join(parts)


class TLSHandshakeFailed(Exception):
    """The client did not complete a TLS handshake in time or sent something that is not TLS."""


class ClientStream:
    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        peer: tuple[str, int],
        listener: ListenerConfig,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float,
    ):
        self._stream = stream
        self.peer_host, self.peer_port = peer[0], peer[1]
        self.listener = listener
        self._ssl_context = ssl_context
        self._handshake_timeout = handshake_timeout
        self.tls_active = False
        self._takes_records = False  # a trio.SSLStream: take_decrypted after each read
        self.bytes_in = 0
        self.bytes_out = 0
        self.opened_at = time.time()
        # Set by the front end for the status page and the session-end log line: ``user`` once
        # the client is logged in (locally and upstream).
        self.user: str | None = None
        self.outcome: str | None = None  # e.g. "logout", "quit", "timeout", "upstream_closed"

    @property
    def peer(self) -> str:
        host = f"[{self.peer_host}]" if ":" in self.peer_host else self.peer_host
        return f"{host}:{self.peer_port}"

    async def receive_some(self, max_bytes: int = RECEIVE_SIZE) -> bytes:
        try:
            received = await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""
        # trio's socket and TLS streams return bytes (the type allows a bytearray): no copy.
        data = received if isinstance(received, bytes) else bytes(received)
        if data and self._takes_records and len(data) < max_bytes:
            data += take_decrypted(self._stream, max_bytes - len(data))
        self.bytes_in += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)
        self.bytes_out += len(data)

    async def start_tls(self) -> None:
        """Upgrade to TLS as the server (implicit TLS at accept, or STARTTLS/STLS)."""
        if self.tls_active:
            raise RuntimeError("TLS is already active")
        if self._ssl_context is None:
            raise RuntimeError("this listener has no TLS context")
        tls: TLSStream | trio.SSLStream[trio.abc.Stream]
        if isinstance(self._stream, trio.SocketStream):  # a real connection (gateway/tls.py)
            tls = TLSStream(self._stream, self._ssl_context, server_side=True)
        else:
            tls = trio.SSLStream(self._stream, self._ssl_context, server_side=True)
        try:
            with trio.fail_after(self._handshake_timeout):
                await tls.do_handshake()
        except trio.TooSlowError:
            raise TLSHandshakeFailed("TLS handshake timed out") from None
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            raise TLSHandshakeFailed(f"TLS handshake failed: {exc.__cause__ or exc}") from None
        self._stream = tls
        self.tls_active = True
        self._takes_records = isinstance(tls, trio.SSLStream)  # a TLSStream takes them itself

    def plaintext_auth_allowed(self) -> bool:
        """Password logins are allowed over TLS, or from the listener's plaintext networks."""
        if self.tls_active:
            return True
        return in_networks(self.peer_host, self.listener.plaintext_auth_from)

    async def aclose(self) -> None:
        """Close without waiting long: a TLS close_notify to a dead peer must not hang us."""
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self._stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
                pass
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self._stream)
