"""IMAP through mailgate against the lab Dovecot: logins, byte-exact FETCH, APPEND, IDLE, limits.

Every test runs the real gateway (``gate``) in front of the real Dovecot, logging in upstream with
XOAUTH2 tokens from the lab OAuth server, and drives it with real clients: raw sockets for
byte-exact checks, Python's imaplib.
"""

from __future__ import annotations

import base64
import hashlib
import imaplib
import re
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.fixtures.imap import Gate, Wire, caps_of, create_mailbox, logged_in, quoted, start_gate
from tests.lab import LabDovecot, LabOAuthServer, seed
from tests.lab.corpus import CORPUS, big_message_chunks, big_message_sha256

pytestmark = pytest.mark.lab

FORBIDDEN_AFTER_LOGIN = re.compile(r"^(AUTH=.*|SASL-IR|STARTTLS|LOGINDISABLED|COMPRESS=.*|LITERAL-)$", re.I)


async def direct_wire(gate: Gate) -> Wire:
    """A raw client logged in straight to the lab Dovecot (the reference)."""
    tcp = await trio.open_tcp_stream(gate.lab.host, gate.lab.ports["imaps"])
    ctx = seed.client_ssl_context(gate.lab)
    w = Wire(trio.SSLStream(tcp, ctx, server_hostname=gate.lab.host), ctx)
    await w.line()
    lines = await w.command(b"D LOGIN " + quoted(gate.upstream_user) + b" " + quoted(gate.lab.password))
    assert lines[-1].startswith(b"D OK"), lines
    return w


async def read_response(w: Wire, tag: bytes) -> bytes:
    """All bytes up to and including the tagged response, literals included, exactly."""
    out = bytearray()
    while True:
        line = await w.line()
        if not line:
            raise EOFError(bytes(out))
        out += line
        m = re.search(rb"\{(\d+)\}\r\n\Z", line)
        if m and not line.startswith(tag + b" "):
            out += await w.exactly(int(m.group(1)))
            continue
        if line.startswith(tag + b" "):
            return bytes(out)


# --------------------------------------------------------------------------- logins


async def test_login_forms_and_capabilities_after_login(gate: Gate) -> None:
    pw = gate.password.encode()
    forms = [
        b"a LOGIN alice " + quoted(gate.password) + b"\r\n",
        b"a LOGIN {5}\r\nalice {%d}\r\n" % len(pw) + pw + b"\r\n",
        b"a LOGIN {5+}\r\nalice {%d+}\r\n" % len(pw) + pw + b"\r\n",
        b"a AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice\0" + pw) + b"\r\n",
    ]
    for form in forms:
        w = await gate.wire()
        await w.line()
        await w.send(form)
        lines = [line for line in await w.until_tagged(b"a") if not line.startswith(b"+ ")]
        assert len(lines) == 1 and lines[0].startswith(b"a OK [CAPABILITY "), (form, lines)
        caps = caps_of(lines[0])
        assert "IMAP4REV1" in {c.upper() for c in caps} and "LITERAL+" in caps
        assert not [c for c in caps if FORBIDDEN_AFTER_LOGIN.match(c)]
        cap_lines = await w.command(b"c CAPABILITY")
        assert {c.upper() for c in caps_of(cap_lines[0])} == {c.upper() for c in caps}
        await w.send(b"z LOGOUT\r\n")
        assert (await w.until_tagged(b"z"))[-1].startswith(b"z OK")
        assert await w.eof()

    # AUTHENTICATE PLAIN without initial response, and AUTHENTICATE LOGIN, over STARTTLS.
    w = await gate.wire("starttls")
    await w.line()
    await w.command(b"s STARTTLS")
    await w.start_tls()
    await w.send(b"p AUTHENTICATE PLAIN\r\n")
    assert await w.line() == b"+ \r\n"
    await w.send(base64.b64encode(b"alice\0alice\0" + pw) + b"\r\n")
    assert (await w.line()).startswith(b"p OK [CAPABILITY ")
    await w.aclose()
    w = await gate.wire()
    await w.line()
    await w.send(b"q AUTHENTICATE LOGIN\r\n")
    assert await w.line() == b"+ VXNlcm5hbWU6\r\n"
    await w.send(base64.b64encode(b"alice") + b"\r\n")
    assert await w.line() == b"+ UGFzc3dvcmQ6\r\n"
    await w.send(base64.b64encode(pw) + b"\r\n")
    assert (await w.line()).startswith(b"q OK [CAPABILITY ")
    await w.aclose()


async def test_imaplib_session_and_refused_commands(gate: Gate) -> None:
    await trio.to_thread.run_sync(create_mailbox, gate)

    def session() -> None:
        c = gate.imaplib()
        assert c.state == "AUTH"
        typ, data = c.capability()
        caps = set(data[0].decode().split())
        assert "IDLE" in caps and not [x for x in caps if FORBIDDEN_AFTER_LOGIN.match(x)]
        typ, data = c.select(gate.mailbox)
        assert typ == "OK" and data == [b"0"]
        typ, data = c.search(None, "ALL")
        assert typ == "OK" and data == [b""]
        assert c.noop()[0] == "OK"
        assert c.logout()[0] == "BYE"

    await trio.to_thread.run_sync(session)
    w = await logged_in(gate)
    assert await w.command(b"x COMPRESS DEFLATE") == [b"x BAD COMPRESS is not supported by this server.\r\n"]
    assert await w.command(b"y STARTTLS") == [b"y BAD STARTTLS is not available after login.\r\n"]
    assert await w.command(b"v LOGIN {5+}\r\nalice x") == [b"v BAD Already logged in.\r\n"]
    assert (await w.command(b"n NOOP"))[-1].startswith(b"n OK")
    await w.aclose()


async def test_refused_command_pipelined_after_idle_is_answered_in_order(gate: Gate) -> None:
    """mailgate's own BAD for a refused command follows the tagged answers of the commands the
    client sent before it (here the IDLE's OK after DONE), as a server's would."""
    await trio.to_thread.run_sync(create_mailbox, gate)
    w = await logged_in(gate)
    await w.command(b"s SELECT " + quoted(gate.mailbox))
    await w.send(b"i IDLE\r\nDONE\r\nx STARTTLS\r\nn NOOP\r\ny LOGIN {5+}\r\nalice x\r\n")
    lines = await w.until_tagged(b"y")
    tagged = [line for line in lines if not line.startswith((b"* ", b"+ "))]
    assert [line.split(b" ", 1)[0] for line in tagged] == [b"i", b"x", b"n", b"y"], lines
    assert lines[0].startswith(b"+ ") and tagged[0].startswith(b"i OK"), lines
    assert tagged[1] == b"x BAD STARTTLS is not available after login.\r\n"
    assert tagged[2].startswith(b"n OK") and tagged[3] == b"y BAD Already logged in.\r\n"
    # Nothing in flight: the answer is immediate, and the session goes on.
    assert await w.command(b"z COMPRESS DEFLATE") == [b"z BAD COMPRESS is not supported by this server.\r\n"]
    assert (await w.command(b"m NOOP"))[-1].startswith(b"m OK")
    await w.aclose()


async def test_commands_pipelined_with_the_login(gate: Gate) -> None:
    w = await gate.wire()
    await w.line()
    await w.send(b"a LOGIN alice " + quoted(gate.password) + b"\r\nb SELECT INBOX\r\nc LOGOUT\r\n")
    assert (await w.until_tagged(b"a"))[-1].startswith(b"a OK")
    assert (await w.until_tagged(b"b"))[-1].startswith(b"b OK")
    assert (await w.until_tagged(b"c"))[-1].startswith(b"c OK")
    assert await w.eof()


# --------------------------------------------------------------------------- mail


async def test_fetch_of_awkward_messages_is_byte_identical(gate: Gate) -> None:
    await trio.to_thread.run_sync(create_mailbox, gate)
    for raw in CORPUS.values():
        await trio.to_thread.run_sync(lambda raw=raw: seed.append(gate.lab, gate.upstream_user, raw, gate.mailbox))
    via, direct = await logged_in(gate), await direct_wire(gate)
    commands = [
        b"EXAMINE " + quoted(gate.mailbox),
        b"UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[])",
        b"FETCH 1:* (BODY.PEEK[HEADER] BODY.PEEK[TEXT] BODYSTRUCTURE ENVELOPE)",
        b"UID FETCH 1:* (BODY.PEEK[]<0.100> BINARY.PEEK[1])",
        b'SEARCH SUBJECT "dot"',
        b"UID SEARCH ALL",
    ]
    for i, cmd in enumerate(commands):
        tag = b"T%d" % i
        answers = []
        for w in (via, direct):
            await w.send(tag + b" " + cmd + b"\r\n")
            answers.append(await read_response(w, tag))
        # Identical up to the tagged line (whose text carries Dovecot's timings).
        assert answers[0].rsplit(b"\r\n" + tag, 1)[0] == answers[1].rsplit(b"\r\n" + tag, 1)[0], cmd
        assert answers[0].rsplit(b"\r\n", 2)[-2].startswith(tag + b" OK")
    await via.aclose()
    await direct.aclose()


async def test_append_with_synchronizing_and_non_synchronizing_literals(gate: Gate) -> None:
    await trio.to_thread.run_sync(create_mailbox, gate)
    w = await logged_in(gate)
    small = b"Subject: sync\r\n\r\nsynchronizing literal\r\n"
    big = b"Subject: nonsync\r\n\r\n" + b"0123456789abcdef" * 1000 + b"\r\n"  # > 4096 bytes
    await w.send(b"a APPEND " + quoted(gate.mailbox) + b" (\\Seen) {%d}\r\n" % len(small))
    assert (await w.line()).startswith(b"+ ")
    await w.send(small + b"\r\n")
    assert (await w.until_tagged(b"a"))[-1].startswith(b"a OK [APPENDUID ")
    await w.send(b"b APPEND " + quoted(gate.mailbox) + b" {%d+}\r\n" % len(big) + big + b"\r\n")
    assert (await w.until_tagged(b"b"))[-1].startswith(b"b OK [APPENDUID ")
    # The upstream refuses a synchronizing literal instead of sending "+": the client does not
    # send it, and its next command is a command again.
    await w.send(b"c APPEND NoSuchBox {10}\r\n")
    assert (await w.line()).startswith(b"c NO [TRYCREATE]")
    assert (await w.command(b"n NOOP"))[-1].startswith(b"n OK")
    await w.aclose()
    uids = await trio.to_thread.run_sync(seed.list_uids, gate.lab, gate.upstream_user, gate.mailbox)
    got = [await trio.to_thread.run_sync(seed.fetch_raw, gate.lab, gate.upstream_user, uid, gate.mailbox)
           for uid in uids]
    assert got == [small, big]


async def test_idle_receives_exists_from_another_session(gate: Gate) -> None:
    await trio.to_thread.run_sync(create_mailbox, gate)
    w = await logged_in(gate)
    await w.command(b"s SELECT " + quoted(gate.mailbox))
    await w.send(b"i IDLE\r\n")
    assert (await w.line()).startswith(b"+ ")
    other = await logged_in(gate)
    msg = b"Subject: while idling\r\n\r\nhello\r\n"
    await other.send(b"a APPEND " + quoted(gate.mailbox) + b" {%d+}\r\n" % len(msg) + msg + b"\r\n")
    assert (await other.until_tagged(b"a"))[-1].startswith(b"a OK")
    line = await w.line()
    while b"EXISTS" not in line and line.startswith(b"* "):
        line = await w.line()
    assert line == b"* 1 EXISTS\r\n"
    await w.send(b"DONE\r\n")
    assert (await w.until_tagged(b"i"))[-1].startswith(b"i OK")
    assert (await w.command(b"n NOOP"))[-1].startswith(b"n OK")
    await w.aclose()
    await other.aclose()


async def test_20_mb_fetch_is_byte_identical_with_bounded_memory(gate: Gate) -> None:
    await trio.to_thread.run_sync(create_mailbox, gate)
    size = 20 * 1024 * 1024
    await trio.to_thread.run_sync(
        lambda: seed.append(gate.lab, gate.upstream_user, big_message_chunks(size), gate.mailbox, size=size)
    )
    w = await logged_in(gate)
    await w.command(b"s SELECT " + quoted(gate.mailbox))
    tracemalloc.start()
    try:
        await w.send(b"f UID FETCH 1 (BODY.PEEK[])\r\n")
        head = await w.line()
        m = re.search(rb"\{(\d+)\}\r\n\Z", head)
        assert head.startswith(b"* 1 FETCH (") and m, head
        digest, left = hashlib.sha256(), int(m.group(1))
        assert left == size
        while left:  # read and hash it in pieces, never holding it
            piece = w.buf[:left] if w.buf else b""
            if not piece:
                await w._fill()
                continue
            digest.update(piece)
            del w.buf[: len(piece)]
            left -= len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest.hexdigest() == big_message_sha256(size)
    assert (await w.until_tagged(b"f"))[-1].startswith(b"f OK")
    assert peak < 8 * 1024 * 1024, f"FETCH of {size} bytes peaked at {peak} bytes of Python memory"
    await w.aclose()


class LiteralMinusDovecot(LabDovecot):
    """The lab Dovecot advertising LITERAL- instead of LITERAL+ (as Gmail does)."""

    def _render_config(self) -> str:
        return super()._render_config() + "\nimap_literal_minus = yes\n"


@pytest.fixture
def literal_minus_lab(oauth_server: LabOAuthServer) -> Iterator[LabDovecot]:
    with LiteralMinusDovecot(oauth_server) as lab:
        yield lab


async def test_large_nonsync_literal_to_a_literal_minus_upstream(
    nursery: trio.Nursery, tmp_path: Path, literal_minus_lab: LabDovecot, oauth_server: LabOAuthServer
) -> None:
    gate = await start_gate(nursery, tmp_path, literal_minus_lab, oauth_server, literal_minus_lab.new_user())
    upstream_caps = await trio.to_thread.run_sync(_direct_caps, literal_minus_lab, gate.upstream_user)
    assert "LITERAL-" in upstream_caps and "LITERAL+" not in upstream_caps
    w = await logged_in(gate)
    caps = caps_of((await w.command(b"c CAPABILITY"))[0])
    assert "LITERAL+" in caps and "LITERAL-" not in caps
    big = b"Subject: big nonsync\r\n\r\n" + b"x" * 10_000 + b"\r\n"
    small = b"Subject: small nonsync\r\n\r\nsmall\r\n"
    for msg in (big, small):
        await w.send(b"a APPEND INBOX {%d+}\r\n" % len(msg) + msg + b"\r\n")
        lines = await w.until_tagged(b"a")
        assert lines == [lines[-1]] and lines[-1].startswith(b"a OK [APPENDUID "), lines  # no stray "+"
    # A refused literal: the upstream says NO instead of "+", the client's octets are dropped.
    await w.send(b"b APPEND NoSuchBox {%d+}\r\n" % len(big) + big + b"\r\nn NOOP\r\n")
    assert (await w.until_tagged(b"b"))[-1].startswith(b"b NO ")
    assert (await w.until_tagged(b"n"))[-1].startswith(b"n OK")
    await w.aclose()
    uids = await trio.to_thread.run_sync(seed.list_uids, literal_minus_lab, gate.upstream_user)
    got = [await trio.to_thread.run_sync(seed.fetch_raw, literal_minus_lab, gate.upstream_user, uid) for uid in uids]
    assert got == [big, small]


def _direct_caps(lab: LabDovecot, user: str) -> set[str]:
    with seed.imap_session(lab, user) as imap:
        untagged, _ = imap.command(b"CAPABILITY")
    return caps_of(untagged[0][0])
