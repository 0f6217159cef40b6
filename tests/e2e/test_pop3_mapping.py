"""RFC 1939 semantics on top of IMAP, through a real mailgate, checked against the lab Dovecot
(and against Dovecot's own POP3 server on the same mailbox)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from gateway.frontends.pop3_mapping import valid_uidl
from tests.fixtures.imap import SeededState
from tests.fixtures.pop3 import PopGate, start_inbox_gate, start_pop_gate, start_proxied_gate
from tests.lab import LabDovecot, LabOAuthServer, seed
from tests.lab.corpus import CORPUS

pytestmark = pytest.mark.lab


def body_lines_of(top_answer: bytes) -> list[bytes]:
    """The body lines of an un-stuffed TOP answer (after the header's blank line)."""
    text = top_answer
    header_end = text.find(b"\r\n\r\n")
    body = text[header_end + 4 :] if header_end >= 0 else b""
    return body.splitlines(keepends=True)


def dovecot_pop3(lab: LabDovecot, user: str, count: int, tops: tuple[int, ...]) -> tuple[
    list[bytes], list[bytes], list[bytes], list[list[bytes]]
]:
    """LIST, UIDL, every RETR and every ``TOP n k`` (k in ``tops``) from Dovecot's own POP3."""
    with seed.pop3_session(lab, user) as pop:
        listing = seed.unstuff(pop.multiline("LIST")[1]).split()
        uidl = seed.unstuff(pop.multiline("UIDL")[1]).split()
        retr = [pop.multiline(f"RETR {n}")[1] for n in range(1, count + 1)]
        top = [[pop.multiline(f"TOP {n} {k}")[1] for k in tops] for n in range(1, count + 1)]
    return listing, uidl, retr, top


async def compare_with_dovecots_pop3(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                                     oauth_server: LabOAuthServer, user: str,
                                     messages: dict[str, bytes], tops: tuple[int, ...] = (2,)) -> None:
    """Store ``messages`` in ``user``'s INBOX; mailgate must give the same sizes, RETR bytes,
    UIDLs and TOPs as Dovecot's own POP3 server."""
    names = list(messages)
    for name in names:
        await trio.to_thread.run_sync(seed.append, lab, user, messages[name])
    gate = await start_inbox_gate(nursery, tmp_path, lab, oauth_server, user)
    d_list, d_uidl, d_retr, d_top = await trio.to_thread.run_sync(dovecot_pop3, lab, user, len(names), tops)
    w = await gate.login()
    _, wire = await w.multiline("LIST")
    assert seed.unstuff(wire).split() == d_list
    _, wire = await w.multiline("UIDL")
    assert seed.unstuff(wire).split() == d_uidl
    sizes = dict(await w.listing("LIST"))
    for n, name in enumerate(names, start=1):
        status, wire = await w.multiline(f"RETR {n}")
        assert wire == d_retr[n - 1], name
        received = seed.unstuff(wire)
        # LIST's size is the message as received; a CRLF the server adds to a message that
        # lacks a final line end belongs to the terminator and is not counted (as Dovecot).
        added = 0 if messages[name].endswith(b"\n") else 2
        assert int(sizes[n]) == len(received) - added, name
        assert status == f"+OK {sizes[n]} octets\r\n".encode()
        for k, expected in zip(tops, d_top[n - 1]):
            _, top = await w.multiline(f"TOP {n} {k}")
            assert top == expected, (name, k)
    await w.command("QUIT")
    await w.eof()


async def test_corpus_matches_dovecots_own_pop3(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                                                oauth_server: LabOAuthServer, lab_user: str) -> None:
    """Every awkward lab message: same sizes, same RETR bytes, same UIDLs, same TOP as Dovecot."""
    await compare_with_dovecots_pop3(nursery, tmp_path, lab, oauth_server, lab_user, CORPUS)


def _mime(encoding: bytes, body: bytes) -> bytes:
    return (b"From: a@example.com\r\nSubject: %s\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: %s\r\n\r\n%s"
            % (encoding, encoding, body))


#: Messages with NUL bytes (RFC 5322 forbids them; mail has them anyway), each served
#: through BINARY (RFC 3516): every part has an identity Content-Transfer-Encoding.
NUL_MESSAGES = {
    "nul_in_body": b"From: a@example.com\r\nSubject: nul\r\n\r\nbefore\x00after\r\n\x00\r\n.\x00\r\n",
    "nul_in_header": b"From: a@example.com\r\nSubject: n\x00ul\r\n\r\nbody\r\n",
    "nul_bare_lf": b"From: a@example.com\nSubject: nul lf\n\nx\x00y\nz\n",
    "nul_no_final_newline": b"Subject: nul end\r\n\r\nends with\x00",
    "nul_8bit": _mime(b"8bit", b"a\x00b \xe4\r\n"),
    "nul_binary": _mime(b"binary", b"\x00\x01\x02\xff\r\n\r\x00\n"),
    "nul_multipart": (
        b"Subject: mp\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
        b"--b\r\nContent-Transfer-Encoding: 8bit\r\n\r\nx\x00y\r\n"
        b"--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nin\x00ner\r\n"
        b"--b--\r\n"
    ),
    # over 64 KiB: TOP reads it in BINARY.PEEK[]<offset.length> windows
    "nul_big": b"Subject: big nul\r\n\r\n" + b"0123456789abcde\x00\r\n" * 8000,
}


async def test_nul_bytes_match_dovecots_own_pop3(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                                                 oauth_server: LabOAuthServer, lab_user: str) -> None:
    """RETR and TOP carry a NUL byte exactly as Dovecot's own POP3 server does (BINARY)."""
    await compare_with_dovecots_pop3(nursery, tmp_path, lab, oauth_server, lab_user, NUL_MESSAGES,
                                     tops=(0, 2, 5000))


async def test_nul_next_to_an_encoded_part_still_arrives_as_0x80(pop_gate: PopGate) -> None:
    """The one difference left: BINARY would decode the base64 part, so mailgate fetches
    BODY[], in which Dovecot sends 0x80 for the NUL (docs/pop3.md, Sizes)."""
    raw = (b"Subject: mixed\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
           b"--b\r\nContent-Transfer-Encoding: 8bit\r\n\r\nx\x00y\r\n"
           b"--b\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n--b--\r\n")
    await pop_gate.append(raw)
    w = await pop_gate.login()
    status, wire = await w.multiline("RETR 1")
    assert status == f"+OK {len(raw)} octets\r\n".encode()
    assert seed.unstuff(wire) == raw.replace(b"\x00", b"\x80")
    await w.command("QUIT")
    await w.eof()


async def test_uidls_stable_across_sessions_and_top_lines(pop_gate: PopGate) -> None:
    body = b"".join(b"line %d\r\n" % i for i in range(1, 11))
    uids = [await pop_gate.append(b"Subject: s%d\r\n\r\n" % i + body) for i in range(3)]
    w = await pop_gate.login()
    first = await w.listing("UIDL")
    for k in (0, 1, 5, 10, 50):
        _, wire = await w.multiline(f"TOP 2 {k}")
        assert body_lines_of(seed.unstuff(wire)) == body.splitlines(keepends=True)[:k]
    await w.command("QUIT")
    await w.eof()
    w = await pop_gate.login()
    assert await w.listing("UIDL") == first
    assert await w.command("UIDL 3") == f"+OK 3 {first[2][1]}\r\n".encode()
    await w.command("QUIT")
    await w.eof()
    assert len({u for _, u in first}) == 3 and all(valid_uidl(u) for _, u in first)
    assert [u for _, u in first][0].startswith(f"{uids[0]:08x}")
    # TOP does not mark \Seen; only RETR does.
    assert "\\Seen" not in await pop_gate.flags(uids[1])


async def test_dele_quit_removes_exactly_those_and_never_others_deleted_flags(pop_gate: PopGate) -> None:
    uids = [await pop_gate.append(b"Subject: m%d\r\n\r\nx\r\n" % i) for i in range(5)]
    w = await pop_gate.login()
    # Meanwhile another IMAP client flags message 4 \Deleted (without expunging).
    await trio.to_thread.run_sync(
        lambda: seed.set_flags(pop_gate.lab, pop_gate.upstream_user, uids[3], ["\\Deleted"],
                               pop_gate.mailbox, op="+FLAGS")
    )
    assert await w.command("DELE 1") == b"+OK Marked to be deleted.\r\n"
    assert await w.command("DELE 3") == b"+OK Marked to be deleted.\r\n"
    assert await w.command("QUIT") == b"+OK Logging out, 2 messages deleted.\r\n"
    await w.eof()
    assert await pop_gate.uids() == [uids[1], uids[3], uids[4]]


async def test_dele_then_dropped_connection_removes_nothing(pop_gate: PopGate) -> None:
    uids = [await pop_gate.append(b"Subject: m%d\r\n\r\nx\r\n" % i) for i in range(2)]
    w = await pop_gate.login()
    assert await w.command("DELE 1") == b"+OK Marked to be deleted.\r\n"
    await w.multiline("RETR 2")
    await w.aclose()  # no QUIT
    with trio.fail_after(10):  # the gateway notices the drop and ends the session (no UPDATE)
        while pop_gate.server.sessions:
            await trio.sleep(0.01)
    w = await pop_gate.login()  # the lock is free again: the first session ended
    assert await w.command("DELE 2") == b"+OK Marked to be deleted.\r\n"
    assert await w.command("RSET") == b"+OK 2 messages (%d octets).\r\n" % (2 * len(b"Subject: m0\r\n\r\nx\r\n"))
    assert await w.command("QUIT") == b"+OK Logging out.\r\n"
    await w.eof()
    assert await pop_gate.uids() == uids
    # A RETR counts as a download even without QUIT (as with Dovecot's own POP3).
    assert "\\Seen" in await pop_gate.flags(uids[1])
    assert "\\Seen" not in await pop_gate.flags(uids[0])


async def test_trash_mode_moves_to_trash(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                                         oauth_server: LabOAuthServer, pop3_seeded: SeededState) -> None:
    gate = await start_pop_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded, delete="trash")
    before = await gate.uids("Trash")
    uids = [await gate.append(b"Subject: t%d\r\n\r\nx\r\n" % i) for i in range(2)]
    w = await gate.login()
    await w.command("DELE 2")
    assert await w.command("QUIT") == b"+OK Logging out, 1 messages moved to Trash.\r\n"
    await w.eof()
    assert await gate.uids() == uids[:1]
    assert len(await gate.uids("Trash")) == len(before) + 1


async def test_keep_mode_only_marks_seen(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                                         oauth_server: LabOAuthServer, pop3_seeded: SeededState) -> None:
    gate = await start_pop_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded, delete="keep")
    uids = [await gate.append(b"Subject: k%d\r\n\r\nx\r\n" % i) for i in range(2)]
    w = await gate.login()
    await w.command("DELE 1")
    assert await w.command("QUIT") == b"+OK Logging out, 1 messages kept and marked seen.\r\n"
    await w.eof()
    assert await gate.uids() == uids
    assert "\\Seen" in await gate.flags(uids[0])
    assert "\\Seen" not in await gate.flags(uids[1])


async def test_message_vanished_upstream_gets_err_and_session_continues(pop_gate: PopGate) -> None:
    uids = [await pop_gate.append(b"Subject: v%d\r\n\r\nx\r\n" % i) for i in range(2)]
    w = await pop_gate.login()

    def expunge_first() -> None:
        with seed.imap_session(pop_gate.lab, pop_gate.upstream_user) as imap:
            imap.select(pop_gate.mailbox)
            imap.command(b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % uids[0])
            imap.command(b"UID EXPUNGE %d" % uids[0])

    await trio.to_thread.run_sync(expunge_first)
    assert await w.command("RETR 1") == b"-ERR Message is no longer available.\r\n"
    assert await w.command("TOP 1 0") == b"-ERR Message is no longer available.\r\n"
    status, _ = await w.multiline("RETR 2")
    assert status.startswith(b"+OK")
    await w.command("DELE 1")
    assert await w.command("QUIT") == b"+OK Logging out, 1 messages deleted.\r\n"
    await w.eof()
    assert await pop_gate.uids() == uids[1:]


async def test_exact_size_is_learned_on_retr_and_remembered(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    pop3_seeded: SeededState,
) -> None:
    """An upstream whose RFC822.SIZE is wrong (as some hosted Exchange servers): the first RETR
    measures the real size, and later sessions list it from the start."""
    gate, proxy = await start_proxied_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded)
    raw = b"Subject: wrong size\r\n\r\n" + b"a line\r\n" * 50
    uid = await gate.append(raw)
    wrong = len(raw) * 3
    proxy.arm("up", "reply", rb"UID FETCH 1:\* \(UID RFC822\.SIZE\)", times=None,
              reply=b"* 1 FETCH (UID %d RFC822.SIZE %d)\r\n{tag} OK Fetch completed.\r\n" % (uid, wrong))
    w = await gate.login()
    assert await w.command("LIST 1") == f"+OK 1 {wrong}\r\n".encode()  # the server's figure
    _, wire = await w.multiline("RETR 1")
    assert seed.unstuff(wire) == raw
    assert await w.command("LIST 1") == f"+OK 1 {len(raw)}\r\n".encode()  # corrected at once
    await w.command("QUIT")
    await w.eof()
    w = await gate.login()
    assert await w.command("STAT") == f"+OK 1 {len(raw)}\r\n".encode()  # remembered
    await w.command("QUIT")
    await w.eof()


async def test_upstream_killed_mid_retr(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                                        oauth_server: LabOAuthServer, pop3_seeded: SeededState) -> None:
    """The client sees the connection end without the final ".", and nothing is deleted."""
    gate, proxy = await start_proxied_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded)
    big = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * 40_000 + b"\r\n"
    uids = [await gate.append(b"Subject: small\r\n\r\nx\r\n"), await gate.append(big)]
    w = await gate.login()
    assert await w.command("DELE 1") == b"+OK Marked to be deleted.\r\n"
    rule = proxy.arm("down", "drop", rb"(?:BODY|BINARY)\[\] ~?\{", after=200_000)
    status = await w.command("RETR 2")
    assert status == f"+OK {len(big)} octets\r\n".encode()
    received = bytearray()
    while chunk := await w.line():
        received += chunk
    assert rule.fired.is_set()
    assert 0 < len(received) < len(big)
    assert not received.endswith(b"\r\n.\r\n")
    await w.aclose()
    proxy.disarm()
    assert await gate.uids() == uids
    assert "\\Seen" not in await gate.flags(uids[1])


async def test_top_of_a_big_message_reads_it_in_windows(pop_gate: PopGate) -> None:
    """TOP of a message over 64 KiB fetches .PEEK[]<offset.length> windows; the result must
    not depend on where the windows split it (here a CRLF straddles the first boundary)."""
    header = b"Subject: big top\r\nX-Pad: "
    line = b"%07d .............................................................................\r\n"
    lines = [line % i for i in range(4000)]  # 87 octets each, ~340 KiB
    first_body_line = b"Line-zero\r\n"
    # Make octet 65535 (the last of the first window) the CR of a CRLF.
    pad = 65535 - len(header) - 4 - len(first_body_line) - 87 * 700 - 85
    raw = header + b"x" * pad + b"\r\n\r\n" + first_body_line + b"".join(lines)
    assert raw[65535:65537] == b"\r\n"
    await pop_gate.append(raw)
    w = await pop_gate.login()
    for k in (0, 1, 3, 702, 1500, 5000):
        _, wire = await w.multiline(f"TOP 1 {k}")
        expected = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" + b"".join(([first_body_line] + lines)[:k])
        assert seed.unstuff(wire) == expected, k
    await w.command("QUIT")
    await w.eof()
