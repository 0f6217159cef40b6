"""Put mail into the lab Dovecot and read it back directly, byte-exactly.

Theory of operation
-------------------
Tests need to seed mailboxes with exact bytes and to know what Dovecot itself answers (the
reference mailgate's IMAP relay and POP3 translation are compared with). Python's ``imaplib``
rewrites line endings in ``append`` and ``poplib`` refuses lines over 2048 bytes, so this
module has two tiny synchronous clients over TLS sockets:

* :class:`DirectIMAP` -- IMAPS with ``LOGIN user labpass``; reads responses line by line and
  collects ``{n}`` literals exactly; ``APPEND`` sends a synchronizing literal (waits for the
  ``+`` continuation) with the message bytes untouched.
* :class:`DirectPOP3` -- POP3S with ``USER``/``PASS``; returns multi-line answers both as the
  raw wire (dot-stuffed, ending ``CRLF.CRLF``) and un-stuffed.

The module-level helpers (:func:`append`, :func:`fetch_raw`, :func:`list_uids`, :func:`flags`,
:func:`set_flags`, :func:`pop3_list_direct`, :func:`pop3_retr_direct`, ...) open one short
connection each. Every socket operation has a deadline of :data:`SOCKET_TIMEOUT`
seconds. They are synchronous: from trio tests call them via ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import itertools
import re
import socket
import ssl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

__all__ = [
    "DirectIMAP",
    "DirectPOP3",
    "IMAPError",
    "POP3Error",
    "append",
    "fetch_raw",
    "list_uids",
    "flags",
    "set_flags",
    "pop3_list_direct",
    "pop3_uidl_direct",
    "pop3_retr_direct",
    "imap_session",
    "pop3_session",
    "client_ssl_context",
    "connect_tls",
    "LineReader",
    "unstuff",
]

#: Deadline of every socket operation (connect, each read, each write).
SOCKET_TIMEOUT = 10.0
#: APPEND is written in chunks of this size (a large message is never copied whole).
WRITE_CHUNK = 256 * 1024
#: Longest response line accepted (literals are read separately and may be any size).
MAX_LINE = 1024 * 1024

_LITERAL_AT_END = re.compile(rb"\{(\d+)\}\r\n$")
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]", re.IGNORECASE)


class LabEndpoint(Protocol):
    """What the helpers need from a :class:`~tests.lab.dovecot.LabDovecot`."""

    host: str
    ports: dict[str, int]
    password: str

    @property
    def ca_file(self) -> object: ...


class IMAPError(Exception):
    """A tagged NO/BAD (or an unexpected answer) from the lab Dovecot."""


class POP3Error(Exception):
    """A ``-ERR`` (or an unexpected answer) from the lab Dovecot."""


def client_ssl_context(lab: LabEndpoint) -> ssl.SSLContext:
    """A client TLS context trusting only the lab CA (hostname ``localhost``/``127.0.0.1``)."""
    return ssl.create_default_context(cafile=str(lab.ca_file))


def connect_tls(lab: LabEndpoint, port_name: str) -> ssl.SSLSocket:
    """A TLS socket to the lab's ``imaps`` or ``pop3s`` port, verified against the lab CA,
    with :data:`SOCKET_TIMEOUT` on every operation."""
    raw = socket.create_connection((lab.host, lab.ports[port_name]), timeout=SOCKET_TIMEOUT)
    try:
        sock = client_ssl_context(lab).wrap_socket(raw, server_hostname=lab.host)
    except BaseException:
        raw.close()
        raise
    sock.settimeout(SOCKET_TIMEOUT)
    return sock


class LineReader:
    """Buffered reads of CRLF lines and exact byte counts from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def _fill(self) -> None:
        data = self._sock.recv(WRITE_CHUNK)
        if not data:
            raise ConnectionError("server closed the connection")
        self._buffer += data

    def line(self) -> bytes:
        """One line including its CRLF."""
        start = 0
        while (end := self._buffer.find(b"\n", start)) < 0:
            if len(self._buffer) > MAX_LINE:
                raise ConnectionError("response line too long")
            start = len(self._buffer)
            self._fill()
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line

    def exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            self._fill()
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data


class DirectIMAP:
    """A minimal IMAPS client logged in as ``user`` with the lab password.

    ``command()`` returns ``(untagged, tagged_line)`` where each untagged response is the list
    of its parts: text segments and literal bytes alternating (a response without literals is
    a one-element list).
    """

    def __init__(self, lab: LabEndpoint, user: str) -> None:
        self._tags = (f"S{n}".encode() for n in itertools.count(1))
        self._sock = connect_tls(lab, "imaps")
        self._reader = LineReader(self._sock)
        try:
            greeting = self._reader.line()
            if not greeting.startswith(b"* OK"):
                raise IMAPError(f"unexpected greeting {greeting!r}")
            self.command(b"LOGIN " + _quote(user) + b" " + _quote(lab.password))
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        """LOGOUT (best effort) and close the socket."""
        try:
            self._sock.sendall(b"Z LOGOUT\r\n")
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> DirectIMAP:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read_response(self) -> list[bytes]:
        """One response: its text segments and literals, in order."""
        parts = [self._reader.line()]
        while (match := _LITERAL_AT_END.search(parts[-1])) is not None:
            parts.append(self._reader.exactly(int(match.group(1))))
            parts.append(self._reader.line())
        return parts

    def command(self, cmd: bytes, *, check: bool = True) -> tuple[list[list[bytes]], bytes]:
        """Send ``TAG cmd`` and collect responses up to the tagged one."""
        tag = next(self._tags)
        self._sock.sendall(tag + b" " + cmd + b"\r\n")
        return self._collect(tag, check=check)

    def _collect(self, tag: bytes, *, check: bool) -> tuple[list[list[bytes]], bytes]:
        untagged: list[list[bytes]] = []
        while True:
            parts = self._read_response()
            if parts[0].startswith(tag + b" "):
                tagged = parts[0]
                if check and not tagged[len(tag) + 1:].upper().startswith(b"OK"):
                    raise IMAPError(tagged.decode("utf-8", "replace").strip())
                return untagged, tagged
            untagged.append(parts)

    def append(self, chunks: Iterable[bytes], size: int, mailbox: str = "INBOX",
               flags: Iterable[str] = ()) -> int:
        """APPEND ``size`` bytes (given as chunks) with a synchronizing literal; return the UID."""
        tag = next(self._tags)
        flag_list = " ".join(flags).encode()
        self._sock.sendall(
            tag + b" APPEND " + _quote(mailbox) + b" (" + flag_list + b") {%d}\r\n" % size
        )
        answer = self._reader.line()
        if not answer.startswith(b"+"):
            raise IMAPError(f"APPEND refused: {answer.decode('utf-8', 'replace').strip()}")
        sent = 0
        for chunk in chunks:
            sent += len(chunk)
            self._sock.sendall(chunk)
        if sent != size:
            raise ValueError(f"APPEND announced {size} bytes but got {sent}")
        self._sock.sendall(b"\r\n")
        _, tagged = self._collect(tag, check=True)
        match = _APPENDUID.search(tagged)
        if match is None:
            raise IMAPError(f"no APPENDUID in {tagged!r}")
        return int(match.group(2))

    def select(self, mailbox: str = "INBOX") -> None:
        self.command(b"SELECT " + _quote(mailbox))

    def fetch_literal(self, uid: int, item: bytes = b"BODY.PEEK[]") -> bytes:
        """The first literal of ``UID FETCH uid (item)`` -- e.g. the whole message."""
        untagged, _ = self.command(b"UID FETCH %d (%s)" % (uid, item))
        for parts in untagged:
            if b" FETCH " in parts[0] and len(parts) > 1:
                return parts[1]
        raise IMAPError(f"no FETCH data for UID {uid}")

    def uids(self) -> list[int]:
        untagged, _ = self.command(b"UID SEARCH ALL")
        for parts in untagged:
            if parts[0].startswith(b"* SEARCH"):
                return [int(n) for n in parts[0][len(b"* SEARCH"):].split()]
        return []

    def flags(self, uid: int) -> set[str]:
        untagged, _ = self.command(b"UID FETCH %d (FLAGS)" % uid)
        for parts in untagged:
            match = re.search(rb"FLAGS \(([^)]*)\)", parts[0])
            if match is not None and b"FETCH" in parts[0]:
                # \Recent belongs to the session, not the message: leave it out.
                return set(match.group(1).decode().split()) - {"\\Recent"}
        raise IMAPError(f"no FLAGS for UID {uid}")


class DirectPOP3:
    """A minimal POP3S client logged in as ``user`` with ``USER``/``PASS``."""

    def __init__(self, lab: LabEndpoint, user: str) -> None:
        self._sock = connect_tls(lab, "pop3s")
        self._reader = LineReader(self._sock)
        try:
            self.greeting = self._status(self._reader.line())
            self.command(f"USER {user}")
            self.command(f"PASS {lab.password}")
        except BaseException:
            self._sock.close()
            raise

    @staticmethod
    def _status(line: bytes) -> bytes:
        if not line.startswith(b"+OK"):
            raise POP3Error(line.decode("utf-8", "replace").strip())
        return line

    def command(self, line: str) -> bytes:
        """Send a single-line command; return the ``+OK`` line (``POP3Error`` on ``-ERR``)."""
        self._sock.sendall(line.encode() + b"\r\n")
        return self._status(self._reader.line())

    def multiline(self, line: str) -> tuple[bytes, bytes]:
        """Send a command with a multi-line answer; return ``(status_line, wire)`` where
        ``wire`` is everything after the status line up to and including ``.\\r\\n``."""
        status = self.command(line)
        lines = []
        while True:
            data = self._reader.line()
            lines.append(data)
            if data == b".\r\n":
                return status, b"".join(lines)

    def quit(self) -> bytes:
        """QUIT (enter UPDATE) and close."""
        try:
            return self.command("QUIT")
        finally:
            self._sock.close()

    def close(self) -> None:
        """Close *without* QUIT: no UPDATE state, nothing deleted."""
        self._sock.close()

    def __enter__(self) -> DirectPOP3:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def unstuff(wire: bytes) -> bytes:
    """A multi-line POP3 answer body as the client sees it: terminator removed, dots unstuffed.

    Lines keep their CRLF; the result ends with CRLF (RFC 1939 always ends with one).
    """
    if not wire.endswith(b".\r\n"):
        raise POP3Error("multi-line answer lacks its terminator")
    body = wire[: -len(b".\r\n")]
    return b"".join(
        line[1:] if line.startswith(b".") else line for line in body.splitlines(keepends=True)
    )


def _quote(text: str) -> bytes:
    """An IMAP quoted string (lab names and passwords are plain ASCII)."""
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _chunks(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), WRITE_CHUNK):
        yield bytes(view[start: start + WRITE_CHUNK])


# --------------------------------------------------------------------- one-shot helpers


@contextmanager
def imap_session(lab: LabEndpoint, user: str) -> Iterator[DirectIMAP]:
    """A logged-in :class:`DirectIMAP`, logged out on exit."""
    client = DirectIMAP(lab, user)
    try:
        yield client
    finally:
        client.close()


@contextmanager
def pop3_session(lab: LabEndpoint, user: str) -> Iterator[DirectPOP3]:
    """A logged-in :class:`DirectPOP3`, closed *without* QUIT on exit (call ``quit()`` to
    enter the UPDATE state yourself)."""
    client = DirectPOP3(lab, user)
    try:
        yield client
    finally:
        client.close()


def append(lab: LabEndpoint, user: str, raw: bytes | Iterable[bytes], mailbox: str = "INBOX",
           flags: Iterable[str] = (), *, size: int | None = None) -> int:
    """Store ``raw`` exactly as given in ``user``'s ``mailbox``; return its UID.

    ``raw`` is bytes, or an iterable of chunks together with ``size`` (e.g.
    :func:`tests.lab.corpus.big_message_chunks`) so a large message is never held whole.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        data = bytes(raw)
        chunks: Iterable[bytes] = _chunks(data)
        size = len(data)
    elif size is None:
        raise TypeError("append() of chunks needs size=")
    else:
        chunks = raw
    with imap_session(lab, user) as imap:
        return imap.append(chunks, size, mailbox, flags)


def fetch_raw(lab: LabEndpoint, user: str, uid: int, mailbox: str = "INBOX") -> bytes:
    """``UID FETCH uid BODY.PEEK[]`` straight from Dovecot (what it really stores/serves)."""
    with imap_session(lab, user) as imap:
        imap.select(mailbox)
        return imap.fetch_literal(uid)


def list_uids(lab: LabEndpoint, user: str, mailbox: str = "INBOX") -> list[int]:
    """All UIDs in ``mailbox``, ascending."""
    with imap_session(lab, user) as imap:
        imap.select(mailbox)
        return imap.uids()


def flags(lab: LabEndpoint, user: str, uid: int, mailbox: str = "INBOX") -> set[str]:
    """The flags of one message, e.g. ``{"\\\\Seen"}`` (without the session flag ``\\Recent``)."""
    with imap_session(lab, user) as imap:
        imap.select(mailbox)
        return imap.flags(uid)


def set_flags(lab: LabEndpoint, user: str, uid: int, new_flags: Iterable[str],
              mailbox: str = "INBOX", *, op: str = "FLAGS") -> None:
    """``UID STORE uid <op>.SILENT (flags)``; ``op`` is ``FLAGS``, ``+FLAGS`` or ``-FLAGS``."""
    if op not in ("FLAGS", "+FLAGS", "-FLAGS"):
        raise ValueError(f"bad STORE operation {op!r}")
    with imap_session(lab, user) as imap:
        imap.select(mailbox)
        imap.command(b"UID STORE %d %s.SILENT (%s)"
                     % (uid, op.encode(), " ".join(new_flags).encode()))


def pop3_list_direct(lab: LabEndpoint, user: str) -> list[tuple[int, int]]:
    """Dovecot's own POP3 ``LIST``: ``[(msg_number, octets)]``."""
    with pop3_session(lab, user) as pop:
        _, wire = pop.multiline("LIST")
    return [(int(n), int(size)) for n, size in
            (line.split() for line in unstuff(wire).splitlines())]


def pop3_uidl_direct(lab: LabEndpoint, user: str) -> list[tuple[int, str]]:
    """Dovecot's own POP3 ``UIDL``: ``[(msg_number, uid_string)]``."""
    with pop3_session(lab, user) as pop:
        _, wire = pop.multiline("UIDL")
    return [(int(n), uid.decode()) for n, uid in
            (line.split() for line in unstuff(wire).splitlines())]


def pop3_retr_direct(lab: LabEndpoint, user: str, n: int, *, wire: bool = False) -> bytes:
    """Dovecot's own POP3 ``RETR n``: the message as a client sees it (un-stuffed, ending in
    CRLF), or with ``wire=True`` the exact bytes after the ``+OK`` line (dot-stuffed, with the
    final ``.\\r\\n``). Closes without QUIT, so nothing changes in the mailbox."""
    with pop3_session(lab, user) as pop:
        _, answer = pop.multiline(f"RETR {n}")
    return answer if wire else unstuff(answer)
