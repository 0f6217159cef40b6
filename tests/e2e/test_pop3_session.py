"""The POP3 dialogue through a real mailgate in front of the lab Dovecot (raw wire)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import trio

from tests.lab import LabDovecot, LabOAuthServer
from tests.fixtures.imap import SeededState
from tests.fixtures.pop3 import PopGate, PopWire, start_pop_gate

pytestmark = pytest.mark.lab

SIMPLE = b"From: a@example.com\r\nSubject: one\r\n\r\nbody one\r\n"
SECOND = b"Subject: two\r\n\r\n.dotted\r\nline 2\r\nline 3\r\n"
S1, S2 = len(SIMPLE), len(SECOND)


async def test_greeting_and_capabilities_before_and_after_login(pop_gate: PopGate) -> None:
    w = await pop_gate.wire("pop3s")
    status, wire = await w.multiline("CAPA")
    caps = wire.decode().split("\r\n")
    assert {"TOP", "UIDL", "USER", "SASL PLAIN", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"} <= set(caps)
    assert "STLS" not in caps and any(c.startswith("IMPLEMENTATION ") for c in caps)
    assert await w.command("USER alice") == b"+OK\r\n"
    assert (await w.command(f"PASS {pop_gate.password}")).startswith(b"+OK Logged in, 0 messages")
    _, wire = await w.multiline("CAPA")
    caps = wire.decode().split("\r\n")
    assert "USER" not in caps and "SASL PLAIN" not in caps and "TOP" in caps
    assert await w.command("QUIT") == b"+OK Logging out.\r\n"
    assert await w.eof()


async def test_stls_discards_pipelined_plaintext(pop_gate: PopGate) -> None:
    w = await pop_gate.wire("stls")
    _, wire = await w.multiline("CAPA")
    caps = wire.decode().split("\r\n")
    assert "STLS" in caps and "USER" not in caps and "SASL PLAIN" not in caps
    assert await w.command("USER alice") == (
        b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections: use STLS.\r\n"
    )
    # A command injected after STLS in the same packet must never run.
    await w.send(b"STLS\r\nUSER injected\r\n")
    assert await w.line() == b"+OK Begin TLS negotiation now.\r\n"
    await w.start_tls()
    _, wire = await w.multiline("CAPA")
    caps = wire.decode().split("\r\n")
    assert "STLS" not in caps and "USER" in caps
    # PASS right away fails: the injected USER was never executed.
    assert await w.command("PASS x") == b"-ERR No username given (send USER first).\r\n"
    await w.aclose()


async def test_plaintext_listener_from_trusted_network(pop_gate: PopGate) -> None:
    w = await pop_gate.login("plain")
    assert await w.command("STAT") == b"+OK 0 0\r\n"
    assert await w.command("STLS") == b"-ERR STLS is not allowed in the TRANSACTION state.\r\n"
    assert await w.command("QUIT") == b"+OK Logging out.\r\n"
    assert await w.eof()


async def test_listener_without_tls_refuses_passwords_without_pointing_to_stls(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    pop3_seeded: SeededState,
) -> None:
    """``tls = "none"`` without ``plaintext_auth_from``: no password login, and the refusal
    must not tell the client to use STLS, which this listener does not offer."""
    no_tls = {"protocol": "pop3", "bind": "127.0.0.1:0", "tls": "none"}
    gate = await start_pop_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded, extra_listeners=(no_tls,))
    w = PopWire(await trio.open_tcp_stream(*gate.server.addresses[3]), gate.ssl_context)
    assert (await w.line()).startswith(b"+OK")
    _, wire = await w.multiline("CAPA")
    assert not {"STLS", "USER", "SASL PLAIN"} & set(wire.decode().split("\r\n"))
    refused = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections: this port offers no TLS.\r\n"
    assert await w.command("USER alice") == refused
    plain = base64.b64encode(f"\0alice\0{gate.password}".encode()).decode()
    assert await w.command(f"AUTH PLAIN {plain}") == refused
    # QUIT in AUTHORIZATION ends the session at once: the pipelined CAPA is never answered.
    await w.send(b"QUIT\r\nCAPA\r\n")
    assert await w.line() == b"+OK Logging out.\r\n"
    assert await w.eof()


async def test_auth_plain_forms_and_cancel(pop_gate: PopGate) -> None:
    w = await pop_gate.wire()
    _, wire = await w.multiline("AUTH")
    assert wire == b"PLAIN\r\n.\r\n"
    assert await w.command("AUTH PLAIN") == b"+ \r\n"
    assert await w.command("*") == b"-ERR Authentication cancelled.\r\n"
    assert await w.command("AUTH CRAM-MD5") == b"-ERR Unsupported authentication mechanism.\r\n"
    await w.aclose()  # three bad commands would close it: start again
    w = await pop_gate.wire()
    blob = base64.b64encode(f"\0alice\0{pop_gate.password}".encode()).decode()
    assert await w.command("AUTH PLAIN") == b"+ \r\n"
    assert (await w.command(blob)).startswith(b"+OK Logged in")
    await w.aclose()
    w = await pop_gate.wire()
    assert (await w.command(f"AUTH PLAIN {blob}")).startswith(b"+OK Logged in")
    await w.aclose()


async def test_failed_logins_get_auth_code_and_close_after_three(pop_gate: PopGate) -> None:
    w = await pop_gate.wire()
    await w.command("USER alice")
    assert await w.command("PASS wrong") == b"-ERR [AUTH] Authentication failed.\r\n"
    await w.command("USER mallory")
    assert await w.command(f"PASS {pop_gate.password}") == b"-ERR [AUTH] Authentication failed.\r\n"
    bad = base64.b64encode(b"\0alice\0nope").decode()
    assert await w.command(f"AUTH PLAIN {bad}") == b"-ERR [AUTH] Authentication failed.\r\n"
    assert await w.line() == b"-ERR Too many bad commands, closing.\r\n"
    assert await w.eof()


async def test_bad_commands_wrong_state_and_long_lines(pop_gate: PopGate) -> None:
    w = await pop_gate.wire()
    assert await w.command("STAT") == b"-ERR STAT is not allowed in the AUTHORIZATION state.\r\n"
    assert await w.command("APOP alice 00112233445566778899aabbccddeeff") == (
        b"-ERR APOP is not supported, use USER/PASS or AUTH PLAIN.\r\n"
    )
    assert await w.command("CAPA") == b"+OK Capability list follows\r\n"
    await w.body()
    assert await w.command(b"USER " + b"x" * 300) == b"-ERR Line too long (limit 255 octets).\r\n"
    assert await w.line() == b"-ERR Too many bad commands, closing.\r\n"
    assert await w.eof()


async def test_transaction_commands(pop_gate: PopGate) -> None:
    uid1 = await pop_gate.append(SIMPLE)
    await pop_gate.append(SECOND)
    w = await pop_gate.login()
    assert await w.command("STAT") == f"+OK 2 {S1 + S2}\r\n".encode()
    assert await w.listing("LIST") == [(1, str(S1)), (2, str(S2))]
    assert await w.command("LIST 2") == f"+OK 2 {S2}\r\n".encode()
    assert await w.command("LIST 3") == b"-ERR No such message.\r\n"
    uidl = await w.listing("UIDL")
    assert uidl[0][1].startswith(f"{uid1:08x}")
    status, body = await w.multiline("TOP 2 1")
    assert body == b"Subject: two\r\n\r\n..dotted\r\n.\r\n"
    assert await w.command("DELE 1") == b"+OK Marked to be deleted.\r\n"
    assert await w.command("DELE 1") == b"-ERR Message is deleted.\r\n"
    assert await w.command("RETR 1") == b"-ERR Message is deleted.\r\n"
    assert await w.command("STAT") == f"+OK 1 {S2}\r\n".encode()
    assert await w.listing("LIST") == [(2, str(S2))]
    assert await w.command("RSET") == f"+OK 2 messages ({S1 + S2} octets).\r\n".encode()
    assert await w.command("NOOP") == b"+OK\r\n"
    status, body = await w.multiline("RETR 1")
    assert status == f"+OK {S1} octets\r\n".encode() and body == SIMPLE + b".\r\n"
    assert await w.command("RETR 0") == b"-ERR Invalid message number.\r\n"
    assert await w.command("QUIT") == b"+OK Logging out.\r\n"
    assert await w.eof()
    assert "\\Seen" in await pop_gate.flags(uid1)


async def test_pipelined_commands_are_answered_in_order(pop_gate: PopGate) -> None:
    await pop_gate.append(SIMPLE)
    w = await pop_gate.login()
    await w.send(b"STAT\r\nLIST 1\r\nRETR 1\r\nNOOP\r\n")
    assert await w.line() == f"+OK 1 {S1}\r\n".encode()
    assert await w.line() == f"+OK 1 {S1}\r\n".encode()
    assert await w.line() == f"+OK {S1} octets\r\n".encode()
    assert await w.body() == SIMPLE + b".\r\n"
    assert await w.line() == b"+OK\r\n"
    await w.aclose()


async def test_second_session_gets_in_use(pop_gate: PopGate) -> None:
    first = await pop_gate.login()
    second = await pop_gate.wire()
    await second.command("USER alice")
    assert await second.command(f"PASS {pop_gate.password}") == (
        b"-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n"
    )
    assert await first.command("QUIT") == b"+OK Logging out.\r\n"
    await first.eof()
    # Once the first session ended, the lock is free again.
    with trio.fail_after(5):
        while True:
            await second.command("USER alice")
            status = await second.command(f"PASS {pop_gate.password}")
            if status.startswith(b"+OK"):
                break
            await trio.sleep(0.05)
    await second.aclose()


async def test_login_timeout_closes_without_answer(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                                                   oauth_server: LabOAuthServer,
                                                   pop3_seeded: SeededState) -> None:
    gate = await start_pop_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded, login_timeout=0.3)
    w = await gate.wire()
    assert await w.line() == b""  # RFC 1939 §3: the autologout sends nothing
    await w.aclose()


async def test_upstream_unreachable_is_sys_temp_and_missing_mailbox_sys_perm(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    pop3_seeded: SeededState,
) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    gate = await start_pop_gate(nursery, tmp_path / "a", lab, oauth_server, pop3_seeded,
                                imap=f"127.0.0.1:{closed_port}")
    w = await gate.wire()
    await w.command("USER alice")
    assert await w.command(f"PASS {gate.password}") == b"-ERR [SYS/TEMP] Temporary failure, try again later.\r\n"
    await w.aclose()
    gate = await start_pop_gate(nursery, tmp_path / "b", lab, oauth_server, pop3_seeded, mailbox="no-such-box")
    w = await gate.wire()
    await w.command("USER alice")
    assert await w.command(f"PASS {gate.password}") == (
        b"-ERR [SYS/PERM] The mailbox cannot be opened upstream.\r\n"
    )
    # The failed login released the maildrop lock and the upstream connection: try again.
    await w.command("USER alice")
    assert (await w.command(f"PASS {gate.password}")).startswith(b"-ERR [SYS/PERM]")
    await w.aclose()
