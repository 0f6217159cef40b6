"""A raw line-oriented client for byte-exact protocol tests (IMAP and POP3 build on it)."""

from __future__ import annotations

import ssl

import trio

IO_TIMEOUT = 10.0  # seconds any single read may take before the test fails


class LineWire:
    """Send bytes; read lines and exact byte counts; upgrade with STARTTLS/STLS."""

    def __init__(self, stream: trio.abc.Stream, ssl_context: ssl.SSLContext):
        self.stream = stream
        self.ssl_context = ssl_context
        self.buf = bytearray()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        with trio.fail_after(IO_TIMEOUT):
            try:
                chunk = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                chunk = b""
        self.buf += chunk
        return bool(chunk)

    async def line(self) -> bytes:
        """One line with its CRLF; what is left (possibly ``b""``) at end of stream."""
        while (idx := self.buf.find(b"\n")) < 0:
            if not await self._fill():
                rest, self.buf = bytes(self.buf), bytearray()
                return rest
        line = bytes(self.buf[: idx + 1])
        del self.buf[: idx + 1]
        return line

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._fill():
                raise EOFError(f"wanted {n} bytes, stream ended after {len(self.buf)}")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def eof(self) -> bool:
        """True once the server closes the connection (after any remaining lines)."""
        while await self._fill():
            pass
        await self.aclose()
        return True

    async def start_tls(self) -> None:
        self.stream = trio.SSLStream(self.stream, self.ssl_context, server_hostname="localhost")
        with trio.fail_after(IO_TIMEOUT):
            await self.stream.do_handshake()

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            await self.stream.aclose()
