"""Awkward test messages, and a deterministic big message generated in chunks.

Theory of operation
-------------------
:data:`CORPUS` maps a short name to the raw bytes of a message that stresses some part of
mail handling: line-ending oddities (bare LF, lone CR, no final newline), POP3 dot-stuffing
(lines starting with ``.``/``..``, a line that is just ``.``), long lines, 8-bit and UTF-8
headers, MIME nesting, and degenerate shapes (empty body, headers only).

Dovecot stores what it is given but *serves* the CRLF form: ``FETCH BODY[]`` and POP3
``RETR`` turn every bare LF into CRLF. :func:`crlf_normalise` is that transformation, so a
test can assert on what Dovecot really returns vs. an expectation derived from the corpus.

:func:`big_message_chunks` yields an exact-size message (MIME, base64 attachment) in chunks
from a seeded PRNG, never holding more than one chunk; :func:`big_message` joins it for callers
that want bytes.
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
from collections.abc import Iterator

__all__ = [
    "CORPUS",
    "crlf_normalise",
    "big_message",
    "big_message_chunks",
    "big_message_sha256",
    "BIG_MESSAGE_SIZE",
]

#: Default size of :func:`big_message` (about 20 MB).
BIG_MESSAGE_SIZE = 20 * 1024 * 1024
#: Raw attachment bytes per base64 line (76 characters, RFC 2045's maximum).
_B64_LINE_RAW = 57
#: Lines of base64 generated per yielded chunk (~600 KiB per chunk).
_LINES_PER_CHUNK = 8192
_BOUNDARY = b"lab-big-boundary-7c1f"

_BARE_LF = re.compile(rb"(?<!\r)\n")


def crlf_normalise(raw: bytes) -> bytes:
    """Bare LF -> CRLF, as Dovecot serves a message (lone CR and everything else untouched)."""
    return _BARE_LF.sub(b"\r\n", raw)


def _msg(headers: str, body: bytes, *, subject: str) -> bytes:
    head = (
        "From: Lab Sender <sender@example.com>\r\n"
        "To: Lab Rcpt <rcpt@example.com>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Tue, 01 Apr 2025 10:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@lab.example.com>\r\n"
        f"{headers}"
    )
    return head.encode("ascii") + b"\r\n" + body


_NESTED = (
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n'
    b"\r\n"
    b"This is a multi-part message in MIME format.\r\n"
    b"--outer\r\n"
    b'Content-Type: multipart/alternative; boundary="inner"\r\n'
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus dem Labor.\r\n"
    b".a line starting with a dot inside a part\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<p>Gr&uuml;&szlig;e</p>\r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"From: inner@example.com\r\n"
    b"Subject: forwarded\r\n"
    b"\r\n"
    b"Inner body.\r\n"
    b"--outer\r\n"
    b'Content-Type: application/octet-stream; name="x.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    + base64.encodebytes(bytes(range(256))).replace(b"\n", b"\r\n")
    + b"--outer--\r\n"
)

#: name -> raw message bytes. Each one stresses a different part of the mail path.
CORPUS: dict[str, bytes] = {
    "simple": _msg("", b"Hello from the lab.\r\n", subject="simple"),
    "bare_lf": (
        b"From: sender@example.com\nTo: rcpt@example.com\nSubject: bare LF\n"
        b"\nline one\nline two\n.dot line\n"
    ),
    "mixed_line_endings": _msg("", b"crlf line\r\nlf line\nanother crlf\r\nend\n",
                               subject="mixed endings"),
    "lone_cr": _msg("", b"before\rafter on same line\r\nnext line\r\n", subject="lone CR"),
    "dot_lines": _msg(
        "", b".starts with a dot\r\n..starts with two dots\r\n...three\r\nmiddle . dot\r\n",
        subject="dot lines",
    ),
    "single_dot_line": _msg("", b"before\r\n.\r\nafter\r\n", subject="single dot line"),
    "ends_with_dot_line": _msg("", b"last line is a dot\r\n.\r\n", subject="ends with dot"),
    "long_line": _msg("", b"x" * 5000 + b"\r\nshort\r\n", subject="long line"),
    "no_final_newline": _msg("", b"the body ends without a newline", subject="no final newline"),
    "eight_bit_headers": (
        b"From: =?utf-8?q?J=C3=BCrgen?= <j@example.com>\r\n"
        b"To: rcpt@example.com\r\n"
        b"Subject: Gr\xfc\xdfe latin-1 raw 8-bit\r\n"
        b"X-Raw-UTF8: \xc3\xa9t\xc3\xa9 \xe2\x82\xac \xf0\x9f\x93\xa7\r\n"
        b"\r\n"
        b"body with 8-bit: \xe4\xf6\xfc and UTF-8: \xc3\xa4\xc3\xb6\xc3\xbc\r\n"
    ),
    "utf8_headers": (
        "From: Zoë Ünicode <zoe@example.com>\r\nTo: 李 <li@example.com>\r\n"
        "Subject: héllo wörld ✉\r\n\r\nUTF-8 body ✓\r\n"
    ).encode("utf-8"),
    "nested_multipart": _msg("", b"", subject="nested multipart")[:-2] + _NESTED,
    "empty_body": _msg("", b"", subject="empty body"),
    "headers_only": (
        b"From: sender@example.com\r\nTo: rcpt@example.com\r\nSubject: headers only\r\n"
    ),
    "trailing_blank_lines": _msg("", b"text\r\n\r\n\r\n", subject="trailing blank lines"),
    "crlf_dot_crlf_inside": _msg("", b"a\r\n.\r\n\r\n.\r\nb\r\n", subject="dot crlf inside"),
}


# --------------------------------------------------------------------- big message


def _big_parts(size: int) -> tuple[bytes, bytes, int, int]:
    """Head, tail, number of full base64 lines and the length of the last (partial) line's
    base64 text, so that head + lines + tail is exactly ``size`` bytes."""
    tail = b"--" + _BOUNDARY + b"--\r\n"  # the last base64 line's CRLF precedes it
    head_template = (
        b"From: Lab Sender <sender@example.com>\r\n"
        b"To: Lab Rcpt <rcpt@example.com>\r\n"
        b"Subject: big message %d bytes\r\n"
        b"Date: Tue, 01 Apr 2025 10:00:00 +0000\r\n"
        b"Message-ID: <big-%d@lab.example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"X-Lab-Padding: %s\r\n"
        b'Content-Type: multipart/mixed; boundary="' + _BOUNDARY + b'"\r\n'
        b"\r\n"
        b"--" + _BOUNDARY + b"\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
        b"A deterministic big message from the mailgate test lab.\r\n"
        b"--" + _BOUNDARY + b"\r\n"
        b'Content-Type: application/octet-stream; name="big.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n"
    )
    minimum = len(head_template % (size, size, b"")) + len(tail)
    if size < minimum + 8:
        raise ValueError(f"big_message size must be at least {minimum + 8} bytes")
    budget = size - minimum  # base64 lines (each 76 chars + CRLF) plus padding
    full_lines, rest = divmod(budget, 78)
    last_chars = 0
    if rest >= 6:  # a last line of >= 4 base64 chars + CRLF
        last_chars = (rest - 2) // 4 * 4
        rest -= last_chars + 2
    head = head_template % (size, size, b"x" * rest)
    return head, tail, full_lines, last_chars


def big_message_chunks(size: int = BIG_MESSAGE_SIZE, seed: int = 0) -> Iterator[bytes]:
    """Yield an exactly ``size``-byte MIME message (CRLF line ends, base64 attachment of
    seeded pseudo-random bytes) in chunks of a few hundred KiB."""
    head, tail, full_lines, last_chars = _big_parts(size)
    rng = random.Random(seed)
    yield head
    remaining = full_lines
    while remaining:
        count = min(remaining, _LINES_PER_CHUNK)
        raw = rng.randbytes(_B64_LINE_RAW * count)
        encoded = base64.b64encode(raw)
        yield b"".join(encoded[i:i + 76] + b"\r\n" for i in range(0, len(encoded), 76))
        remaining -= count
    if last_chars:
        yield base64.b64encode(rng.randbytes(last_chars // 4 * 3)) + b"\r\n"
    yield tail


def big_message(size: int = BIG_MESSAGE_SIZE, seed: int = 0) -> bytes:
    """:func:`big_message_chunks` joined into bytes (holds the whole message)."""
    return b"".join(big_message_chunks(size, seed))


def big_message_sha256(size: int = BIG_MESSAGE_SIZE, seed: int = 0) -> str:
    """SHA-256 hex digest of the big message, computed chunk by chunk."""
    digest = hashlib.sha256()
    for chunk in big_message_chunks(size, seed):
        digest.update(chunk)
    return digest.hexdigest()
