"""Put the benchmark's mail into the lab Dovecot.

Theory of operation
-------------------
Big messages go in with the lab's own byte-exact :func:`tests.lab.seed.append`, streamed
from :func:`tests.lab.corpus.big_message_chunks` (never held whole). Ten thousand small
messages one APPEND at a time would cost ten thousand round trips, so :func:`bulk_append`
sends MULTIAPPEND commands (RFC 3502) with non-synchronizing ``{n+}`` literals (LITERAL+,
RFC 7888, which Dovecot offers): one round trip per :data:`BULK_BATCH` messages.

:func:`small_message` is deterministic: mailboxes seeded with the same arguments are
byte-identical, so a mailgate mailbox and its direct twin compare like for like.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator

from bench.labproc import LabInfo
from bench.wire import Credentials, Endpoint, IMAPClient, ProtocolError, client_context

__all__ = ["small_message", "bulk_append", "append_big", "SMALL_MESSAGE_SIZE"]

#: Messages per MULTIAPPEND command.
BULK_BATCH = 500
#: Size of :func:`small_message` (the issue's "2 KB message").
SMALL_MESSAGE_SIZE = 2048


def small_message(n: int, size: int = SMALL_MESSAGE_SIZE) -> bytes:
    """Message number ``n``: headers and a text body, exactly ``size`` bytes, CRLF line ends."""
    head = (
        f"From: Bench Sender <sender@example.com>\r\n"
        f"To: Bench Rcpt <rcpt@example.com>\r\n"
        f"Subject: bench message {n}\r\n"
        f"Date: Tue, 01 Apr 2025 10:00:00 +0000\r\n"
        f"Message-ID: <bench-{n}@lab.example.com>\r\n\r\n"
    ).encode()
    line = f"line of message {n} ".encode()
    body = bytearray()
    while len(head) + len(body) < size:
        body += line + b"x" * max(0, 70 - len(line)) + b"\r\n"
    message = head + bytes(body[: size - len(head) - 2]) + b"\r\n"
    if len(message) != size:
        raise ValueError(f"size {size} is too small for a message")
    return message


def _imap(lab: LabInfo, user: str, context: ssl.SSLContext) -> IMAPClient:
    client = IMAPClient.connect(Endpoint(lab.host, lab.ports["imaps"], lab.ca_file), context)
    client.login(Credentials("login", user, lab.password))
    return client


def bulk_append(lab: LabInfo, user: str, messages: Iterator[bytes], mailbox: str = "INBOX"
                ) -> int:
    """Append every message of ``messages`` to ``user``'s ``mailbox``; return how many."""
    context = client_context(lab.ca_file)
    client = _imap(lab, user, context)
    count = 0
    try:
        batch: list[bytes] = []
        for message in messages:
            batch.append(message)
            if len(batch) == BULK_BATCH:
                _multiappend(client, mailbox, batch)
                count += len(batch)
                batch = []
        if batch:
            _multiappend(client, mailbox, batch)
            count += len(batch)
    finally:
        client.logout()
    return count


def _multiappend(client: IMAPClient, mailbox: str, batch: list[bytes]) -> None:
    parts = [b'APPEND "' + mailbox.encode() + b'"']
    for message in batch:
        parts.append(b" () {%d+}\r\n" % len(message))
        parts.append(message)
    client.command(b"".join(parts))


def append_big(lab: LabInfo, user: str, size: int) -> int:
    """Append the lab's deterministic ``size``-byte message to ``user``'s INBOX; its UID."""
    from tests.lab.corpus import big_message_chunks
    from tests.lab.seed import append

    try:
        return append(lab, user, big_message_chunks(size), size=size)
    except Exception as exc:  # the lab's IMAPError: say which mailbox
        raise ProtocolError(f"seeding {size} bytes for {user} failed: {exc}") from exc
