"""Raw-socket IMAP and POP3 clients that are not themselves the bottleneck.

Theory of operation
-------------------
Python's ``imaplib`` and ``poplib`` read a message line by line and cap out near 100 MB/s;
a gateway doing 500+ MB/s would look slow through them. These clients are blocking
``ssl`` sockets (``TCP_NODELAY`` set, as any interactive client does) with one buffer:

* control lines (greetings, tagged answers, ``+OK``) are read through a small line buffer;
* bulk data -- an IMAP ``{n}`` literal, a POP3 multi-line answer -- is read with
  ``recv_into`` into one preallocated buffer and *counted*, never kept or parsed: the client
  costs one TLS decryption and a length check per 16 KiB record. A POP3 answer ends at the
  first ``CRLF.CRLF`` (dot-stuffing guarantees it cannot occur earlier); it is searched in
  place in the receive buffer, and bytes after it are kept for the next answer.

Every socket operation has a deadline (:data:`IO_TIMEOUT`). Nothing here logs or prints a
password or token.
"""

from __future__ import annotations

import base64
import itertools
import re
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Endpoint",
    "Credentials",
    "Connection",
    "IMAPClient",
    "POP3Client",
    "ProtocolError",
    "client_context",
    "imap_login",
    "xoauth2_initial_response",
]

#: Deadline of every connect, read and write.
IO_TIMEOUT = 60.0
#: Size of the bulk receive buffer (TLS hands out at most 16 KiB per read anyway).
BULK_BUFFER = 256 * 1024
#: Size of one ``recv`` for control lines.
LINE_RECV = 65536
#: Longest control line accepted.
MAX_LINE = 1024 * 1024
#: End of a POP3 multi-line answer (the leading CRLF ends the last data line).
POP3_TERMINATOR = b"\r\n.\r\n"

_LITERAL_AT_END = re.compile(rb"\{(\d+)\}\r\n$")


class ProtocolError(Exception):
    """The server said NO/BAD/-ERR, or something unexpected. Never contains a secret."""


@dataclass(frozen=True)
class Endpoint:
    """Where to connect: implicit TLS on ``host:port``, certificate checked for ``server_name``
    against ``ca_file``."""

    host: str
    port: int
    ca_file: Path
    server_name: str = "localhost"


@dataclass(frozen=True)
class Credentials:
    """How to log in: ``mechanism`` is ``"login"`` (IMAP LOGIN / POP3 USER+PASS with a password)
    or ``"xoauth2"`` (SASL XOAUTH2 with an access token)."""

    mechanism: str
    user: str
    secret: str

    def __repr__(self) -> str:  # never show the secret
        return f"Credentials({self.mechanism!r}, {self.user!r}, ***)"


def client_context(ca_file: Path) -> ssl.SSLContext:
    """A verifying client context trusting ``ca_file``."""
    return ssl.create_default_context(cafile=str(ca_file))


def xoauth2_initial_response(user: str, token: str) -> bytes:
    """``base64("user=" U ^A "auth=Bearer " T ^A ^A)`` (Google's XOAUTH2)."""
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    return base64.b64encode(raw)


class Connection:
    """One TLS connection with a line buffer and a counting bulk reader."""

    def __init__(self, sock: socket.socket, bulk_size: int = BULK_BUFFER,
                 line_recv: int = LINE_RECV) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._line_recv = line_recv
        self._bulk_size = bulk_size
        self._bulk = bytearray(bulk_size)
        self._bulk_view = memoryview(self._bulk)

    @classmethod
    def open(cls, endpoint: Endpoint, context: ssl.SSLContext,
             timeout: float = IO_TIMEOUT) -> Connection:
        raw = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = context.wrap_socket(raw, server_hostname=endpoint.server_name)
        except BaseException:
            raw.close()
            raise
        sock.settimeout(timeout)
        return cls(sock)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(self._line_recv)
        if not data:
            raise ConnectionError("the server closed the connection")
        self._buffer += data

    def line(self) -> bytes:
        """One line including its CRLF."""
        start = 0
        while (end := self._buffer.find(b"\n", start)) < 0:
            if len(self._buffer) > MAX_LINE:
                raise ProtocolError("response line too long")
            start = len(self._buffer)
            self._fill()
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line

    def discard(self, count: int) -> None:
        """Read exactly ``count`` bytes and drop them."""
        taken = min(count, len(self._buffer))
        del self._buffer[:taken]
        remaining = count - taken
        while remaining:
            n = self.sock.recv_into(self._bulk_view, min(remaining, self._bulk_size))
            if not n:
                raise ConnectionError("the server closed the connection inside a literal")
            remaining -= n

    def discard_multiline(self) -> int:
        """Read a POP3 multi-line answer's body up to and including its terminator (the status
        line already read); return the bytes read. Bytes after the terminator stay buffered
        for the next :meth:`line`."""
        total = 0
        tail = b"\r\n"  # the status line's CRLF: an empty answer is just ".\r\n"
        if self._buffer:
            window = tail + bytes(self._buffer)
            end = window.find(POP3_TERMINATOR)
            if end >= 0:
                used = end + len(POP3_TERMINATOR) - len(tail)
                del self._buffer[:used]
                return used
            total = len(self._buffer)
            tail = window[-4:]
            self._buffer.clear()
        while True:
            n = self.sock.recv_into(self._bulk_view, self._bulk_size)
            if not n:
                raise ConnectionError("the server closed the connection inside an answer")
            # A terminator across the previous read and this one, else inside this one
            # (searched in place: no copy of the data).
            straddle = (tail + bytes(self._bulk_view[:min(n, 4)])).find(POP3_TERMINATOR)
            if straddle >= 0:
                used = straddle + len(POP3_TERMINATOR) - len(tail)
            else:
                inside = self._bulk.find(POP3_TERMINATOR, 0, n)
                used = -1 if inside < 0 else inside + len(POP3_TERMINATOR)
            if used >= 0:
                self._buffer += self._bulk_view[used:n]
                return total + used
            total += n
            tail = (tail + bytes(self._bulk_view[max(0, n - 4):n]))[-4:]


class IMAPClient:
    """A logged-in (or about to be) IMAP session over a :class:`Connection`."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._tags = (b"B%d" % n for n in itertools.count(1))
        self.greeting = b""

    @classmethod
    def connect(cls, endpoint: Endpoint, context: ssl.SSLContext) -> IMAPClient:
        client = cls(Connection.open(endpoint, context))
        try:
            client.greeting = client.conn.line()
            if not client.greeting.startswith(b"* OK"):
                raise ProtocolError(f"unexpected greeting {client.greeting[:80]!r}")
        except BaseException:
            client.conn.close()
            raise
        return client

    def close(self) -> None:
        self.conn.close()

    def _collect(self, tag: bytes) -> tuple[list[bytes], bytes, int]:
        """Responses up to the tagged one: (untagged lines, tagged line, literal bytes)."""
        untagged: list[bytes] = []
        literal_bytes = 0
        while True:
            line = self.conn.line()
            while (match := _LITERAL_AT_END.search(line)) is not None:
                size = int(match.group(1))
                self.conn.discard(size)
                literal_bytes += size
                line = line[: match.start()] + b"{literal}" + self.conn.line()
            if line.startswith(tag + b" "):
                return untagged, line, literal_bytes
            untagged.append(line)

    def command(self, cmd: bytes, *, check: bool = True) -> tuple[list[bytes], bytes, int]:
        """``TAG cmd``; returns (untagged lines, tagged line, bytes of literals read)."""
        tag = next(self._tags)
        self.conn.send(tag + b" " + cmd + b"\r\n")
        untagged, tagged, literal_bytes = self._collect(tag)
        if check and not tagged[len(tag) + 1:].upper().startswith(b"OK"):
            raise ProtocolError(_redact_tagged(tagged))
        return untagged, tagged, literal_bytes

    def login(self, credentials: Credentials) -> None:
        if credentials.mechanism == "xoauth2":
            blob = xoauth2_initial_response(credentials.user, credentials.secret)
            tag = next(self._tags)
            self.conn.send(tag + b" AUTHENTICATE XOAUTH2 " + blob + b"\r\n")
            line = self.conn.line()
            if line.startswith(b"+"):  # an error challenge: answer empty, then the NO follows
                self.conn.send(b"\r\n")
                line = self.conn.line()
            while not line.startswith(tag + b" "):
                line = self.conn.line()
            if not line[len(tag) + 1:].upper().startswith(b"OK"):
                raise ProtocolError(_redact_tagged(line))
        elif credentials.mechanism == "login":
            self.command(b"LOGIN " + _quote(credentials.user) + b" " + _quote(credentials.secret))
        else:
            raise ValueError(f"unknown mechanism {credentials.mechanism!r}")

    def select(self, mailbox: str = "INBOX") -> None:
        self.command(b"SELECT " + _quote(mailbox))

    def fetch_body(self, uid: int) -> int:
        """``UID FETCH uid (BODY.PEEK[])``: the literal's size (the bytes are read, not kept)."""
        _, _, size = self.command(b"UID FETCH %d (BODY.PEEK[])" % uid)
        if not size:
            raise ProtocolError(f"no body for UID {uid}")
        return size

    def idle(self) -> None:
        """Enter IDLE: send it and wait for the continuation (the session then sits idle)."""
        self._idle_tag = next(self._tags)
        self.conn.send(self._idle_tag + b" IDLE\r\n")
        line = self.conn.line()
        while not line.startswith(b"+"):
            if line.startswith(self._idle_tag + b" "):
                raise ProtocolError(_redact_tagged(line))
            line = self.conn.line()

    def logout(self) -> None:
        """LOGOUT, waiting for its tagged answer (best effort), then close."""
        try:
            self.command(b"LOGOUT", check=False)
        except (OSError, ConnectionError, ProtocolError):
            pass
        finally:
            self.close()


class POP3Client:
    """A POP3 session over a :class:`Connection`."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    @classmethod
    def connect(cls, endpoint: Endpoint, context: ssl.SSLContext) -> POP3Client:
        client = cls(Connection.open(endpoint, context))
        try:
            client._status(client.conn.line())
        except BaseException:
            client.conn.close()
            raise
        return client

    @staticmethod
    def _status(line: bytes) -> bytes:
        if not line.startswith(b"+OK"):
            raise ProtocolError(line[:200].decode("utf-8", "replace").strip())
        return line

    def command(self, line: bytes) -> bytes:
        self.conn.send(line + b"\r\n")
        return self._status(self.conn.line())

    def login(self, credentials: Credentials) -> None:
        if credentials.mechanism != "login":
            raise ValueError("POP3 benchmarks log in with USER/PASS")
        self.command(b"USER " + credentials.user.encode())
        self.conn.send(b"PASS " + credentials.secret.encode() + b"\r\n")
        line = self.conn.line()
        if not line.startswith(b"+OK"):
            raise ProtocolError("PASS refused: " + line[:120].decode("utf-8", "replace").strip())

    def multiline(self, line: bytes) -> int:
        """A command with a multi-line answer; returns the answer's size on the wire."""
        self.command(line)
        return self.conn.discard_multiline()

    def stat(self) -> tuple[int, int]:
        parts = self.command(b"STAT").split()
        return int(parts[1]), int(parts[2])

    def quit(self) -> None:
        try:
            self.command(b"QUIT")
        except (OSError, ConnectionError, ProtocolError):
            pass
        finally:
            self.conn.close()

    def close(self) -> None:
        self.conn.close()


def imap_login(endpoint: Endpoint, context: ssl.SSLContext, credentials: Credentials
               ) -> tuple[IMAPClient, float]:
    """Connect, read the greeting, log in; return the session and the seconds it took
    (connect -> tagged OK)."""
    start = time.perf_counter()
    client = IMAPClient.connect(endpoint, context)
    try:
        client.login(credentials)
    except BaseException:
        client.close()
        raise
    return client, time.perf_counter() - start


def _quote(text: str) -> bytes:
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _redact_tagged(line: bytes) -> str:
    """A tagged NO/BAD for an error message (the server's text, never our command)."""
    return line[:200].decode("utf-8", "replace").strip()
