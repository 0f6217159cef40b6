"""TLS over a trio TCP stream, driven directly: the record layer of both of mailgate's connections.

Theory of operation
-------------------
:class:`TLSStream` is a ``trio.abc.Stream`` that runs OpenSSL (an ``ssl.SSLObject`` on memory
BIOs) over the file descriptor of a ``trio.SocketStream``. It does what ``trio.SSLStream`` does
for a relay, with fewer trips through the scheduler: a relayed small round trip crosses four TLS
operations, and ``SSLStream``'s general machinery (locks, conflict detectors, a checkpoint per
socket call) was most of mailgate's CPU time per round trip (docs/performance.md, "The relay
hot path").

Rules:

1. Ciphertext is read with one ``os.read`` of up to :data:`READ_SIZE` bytes, and only when
   OpenSSL has no whole record left: the incoming buffer holds at most one partial record plus
   one read. A receive returns every plaintext byte already decryptable, up to ``max_bytes``
   (several records: one scheduler trip per read, not per record).
2. Plaintext is encrypted in pieces of at most :data:`WRITE_CHUNK` bytes, each sent before the
   next is encrypted: the outgoing buffer is bounded too. Only one task writes to the socket at
   a time (a receive may have to send, e.g. a TLS 1.3 key update answer); another waits until
   the writer is done.
3. Waiting is ``trio.lowlevel.wait_readable``/``wait_writable`` on the descriptor. Every
   operation checks for cancellation first; one that completes without waiting still yields
   once to the scheduler (a receive; a send yields only when it had to wait), so a session
   streaming data cannot starve the others.
4. Errors as ``trio.SSLStream`` reports them: a TLS or socket error, an end of the TCP stream
   without ``close_notify`` and a cancelled send with ciphertext half written break the stream
   (``trio.BrokenResourceError``, the cause chained); ``close_notify`` is end-of-file (``b""``);
   use after :meth:`aclose` is ``trio.ClosedResourceError``.
5. The stream reads the socket only through OpenSSL, from the start of the handshake on: bytes
   a client pipelined after ``STARTTLS`` that are still in the kernel are read as handshake
   data and fail it (the front ends discard what they had already read: gateway/net.py).
6. :meth:`aclose` sends ``close_notify`` if the socket takes it at once, never waits for the
   peer's, then closes the TCP stream (which wakes any task still waiting on the descriptor).
"""

from __future__ import annotations

import os
import ssl

import trio

__all__ = ["READ_SIZE", "WRITE_CHUNK", "TLSStream"]

#: Ciphertext asked of the socket per read.
READ_SIZE = 64 * 1024
#: Most plaintext encrypted before it is sent (bounds the outgoing ciphertext buffer).
WRITE_CHUNK = 64 * 1024
#: Plaintext returned by a receive that does not say how much.
DEFAULT_RECEIVE = 64 * 1024


class TLSStream(trio.abc.Stream):
    """TLS over ``transport`` (a connected ``trio.SocketStream``); see the module docstring.

    Call :meth:`do_handshake` first (under the caller's deadline)."""

    # Two per relayed session, most of them idle: no instance dict.
    __slots__ = ("transport_stream", "_fd", "_incoming", "_outgoing", "_obj", "_writing",
                 "_writer_done", "_broken", "_closed", "_shut", "_tickets", "_drained")

    def __init__(
        self,
        transport: trio.SocketStream,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        self.transport_stream = transport
        self._fd = transport.socket.fileno()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side,
            server_hostname=server_hostname,
        )
        self._writing = False  # a task is sending ciphertext
        self._writer_done: trio.lowlevel.ParkingLot | None = None  # tasks waiting for it
        self._broken = False
        self._closed = False
        self._shut = False  # the peer's close_notify was read
        self._tickets = b""  # TLS 1.3 session tickets held back until our first write
        self._drained = False  # the last read returned less than asked: the socket was empty

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._obj

    # -- internals

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if self._broken:
            raise trio.BrokenResourceError("the TLS stream is broken")

    def _break(self, exc: BaseException) -> trio.BrokenResourceError:
        self._broken = True
        error = trio.BrokenResourceError(f"TLS connection broken: {exc}")
        error.__cause__ = exc
        return error

    async def _flush(self) -> bool:
        """Send every byte of ciphertext OpenSSL has produced; returns whether it waited."""
        waited = False
        while self._writing:
            if self._writer_done is None:
                self._writer_done = trio.lowlevel.ParkingLot()
            await self._writer_done.park()
            waited = True
        out = self._outgoing
        if not out.pending:
            return waited
        self._writing = True
        pending = memoryview(self._tickets + out.read() if self._tickets else out.read())
        self._tickets = b""
        try:
            while True:
                try:
                    sent = os.write(self._fd, pending)
                except BlockingIOError:
                    sent = -1
                if sent < 0:  # (waited for outside the except block, see _fill)
                    await trio.lowlevel.wait_writable(self._fd)
                    waited = True
                    continue
                pending = pending[sent:]
                if not pending:
                    if not out.pending:
                        return waited
                    pending = memoryview(out.read())
        except OSError as exc:
            raise self._break(exc) from exc
        except BaseException:
            if pending:  # cancelled (or closed) with a record half sent: the stream is unusable
                self._broken = True
            raise
        finally:
            self._writing = False
            if self._writer_done:  # (None or empty: nobody waits)
                self._writer_done.unpark_all()

    def _decrypt(self, limit: int) -> bytes | None:
        """Plaintext OpenSSL can give now (up to ``limit``); ``b""`` at close_notify, ``None``
        when it needs more ciphertext. OpenSSL is only asked when it has bytes to work on (a
        want-read answer is an exception, and most receives of a relay find nothing)."""
        obj = self._obj
        if self._shut:
            return b""
        if not self._incoming.pending and not obj.pending() and not self._incoming.eof:
            return None
        try:
            data = obj.read(limit)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLZeroReturnError:
            self._shut = True
            return b""
        except ssl.SSLError as exc:
            raise self._break(exc) from exc
        if not data or len(data) >= limit:
            return data
        parts = [data]
        limit -= len(data)
        while limit > 0 and (self._incoming.pending or obj.pending()):
            try:
                more = obj.read(limit)
            except ssl.SSLZeroReturnError:
                self._shut = True  # returned by the next receive
                break
            except ssl.SSLError:  # want-read (a partial record), a bad record: the next receive
                break
            if not more:
                break
            parts.append(more)
            limit -= len(more)
        return b"".join(parts) if len(parts) > 1 else data

    async def _fill(self) -> bool:
        """Read ciphertext into OpenSSL (end of stream included); returns whether it waited."""
        waited = False
        if self._drained:  # the last read emptied the socket: wait, rather than fail a read
            await trio.lowlevel.wait_readable(self._fd)
            waited = True
        while True:
            try:
                chunk = os.read(self._fd, READ_SIZE)
                break
            except BlockingIOError:
                pass
            except OSError as exc:
                raise self._break(exc) from exc
            # Waited for outside the except block: a task suspended inside one keeps the
            # exception and its traceback alive (about 1 KiB per idle connection).
            await trio.lowlevel.wait_readable(self._fd)
            waited = True
        self._drained = len(chunk) < READ_SIZE
        if chunk:
            self._incoming.write(chunk)
        else:
            self._incoming.write_eof()
        return waited

    # -- the trio.abc.Stream interface

    async def do_handshake(self) -> None:
        """Run the TLS handshake (server or client side, as constructed)."""
        self._check()
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if self._incoming.eof:
                    raise self._break(ssl.SSLEOFError("EOF during the TLS handshake"))
                await self._fill()
                continue
            except (ssl.SSLError, ssl.CertificateError) as exc:
                try:
                    await self._flush()  # the alert, if any
                except trio.BrokenResourceError:
                    pass
                raise self._break(exc) from exc
            if self._obj.server_side and self._obj.version() == "TLSv1.3":
                # The session tickets OpenSSL writes right after the handshake go out with
                # our first data, as trio.SSLStream does: a client that closes without
                # reading them would otherwise make its kernel reset the connection.
                self._tickets = self._outgoing.read()
            await self._flush()
            return

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check()
        limit = DEFAULT_RECEIVE if max_bytes is None else max_bytes
        if limit < 1:
            raise ValueError("max_bytes must be >= 1")
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            data = self._decrypt(limit)
            if self._outgoing.pending:
                waited = await self._flush() or waited
            if data is not None:
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            if self._incoming.eof:  # OpenSSL wants more, the TCP stream has ended
                raise self._break(ssl.SSLEOFError("EOF without close_notify"))
            waited = await self._fill() or waited
            self._check()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        await trio.lowlevel.checkpoint_if_cancelled()
        if not data:
            return
        if len(data) <= WRITE_CHUNK:
            pieces: list[bytes | bytearray | memoryview] = [data]
        else:
            view = memoryview(data)
            pieces = [view[i:i + WRITE_CHUNK] for i in range(0, len(view), WRITE_CHUNK)]
        for piece in pieces:
            try:
                self._obj.write(piece)
            except ssl.SSLError as exc:
                raise self._break(exc) from exc
            await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await trio.lowlevel.wait_writable(self._fd)

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        if not self._broken and not self._writing:
            try:
                self._obj.unwrap()
            except ssl.SSLError:
                pass  # want-read: the peer's close_notify is not awaited
            try:
                if self._outgoing.pending:
                    os.write(self._fd, self._outgoing.read())
            except OSError:
                pass  # the socket would block or is gone: close without close_notify
        self._closed = True
        await self.transport_stream.aclose()
