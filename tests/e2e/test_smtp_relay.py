"""Relay mode for devices that cannot log in, and proof that mailgate is never an open relay:
from outside the relay networks, with forged senders, and with AUTH as one user claiming
another user's address."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.lab import LabDovecot, LabOAuthServer
from tests.fixtures.imap import SeededState
from tests.fixtures.smtp import (
    ALIAS,
    SmtpGate,
    new_rcpt,
    start_smtp_gate,
    strip_trace,
)

pytestmark = pytest.mark.lab


async def send_unauthenticated(gate: SmtpGate, listener: str, sender: str, rcpt: str) -> list[int]:
    """EHLO (STARTTLS where offered), MAIL, RCPT, DATA without AUTH; the codes seen."""
    wire = await gate.wire(listener)
    codes = [(await wire.command("EHLO scanner.lan"))[0]]
    if listener == "elsewhere":
        assert (await wire.command("STARTTLS"))[0] == 220
        await wire.start_tls()
        assert (await wire.command("EHLO scanner.lan"))[0] == 250
    codes.append((await wire.command(f"MAIL FROM:<{sender}>"))[0])
    codes.append((await wire.command(f"RCPT TO:<{rcpt}>"))[0])
    code = (await wire.command("DATA"))[0]
    codes.append(code)
    if code == 354:
        await wire.send(b"Subject: scan\r\n\r\nscanned page\r\n.\r\n")
        codes.append((await wire.reply())[0])
    await wire.aclose()
    return codes


async def unlock(gate: SmtpGate) -> None:
    """The seeded account is sealed with its user's password: one login unlocks it."""
    wire = await gate.login()
    await wire.command("QUIT")
    await wire.aclose()


async def test_relay_network_sends_as_the_relay_user(smtp_gate: SmtpGate) -> None:
    await unlock(smtp_gate)
    rcpt = new_rcpt()
    assert await send_unauthenticated(smtp_gate, "relay", smtp_gate.upstream_user, rcpt) == [250, 250, 250, 354, 250]
    [stored] = await smtp_gate.received(rcpt)
    assert stored.mail_from == smtp_gate.upstream_user
    assert strip_trace(stored.data) == b"Subject: scan\r\n\r\nscanned page\r\n"
    messages = [e for e in smtp_gate.server.ctx.events.recent if e["type"] == "smtp.message"]
    assert messages[-1]["relay"] is True and messages[-1]["user"] == "alice"


async def test_relay_checks_the_sender(smtp_gate: SmtpGate) -> None:
    await unlock(smtp_gate)
    rcpt = new_rcpt()
    # A forged sender from the relay network: refused, nothing sent.
    assert await send_unauthenticated(smtp_gate, "relay", "ceo@example.com", rcpt) == [250, 553, 503, 503]
    # The relay user's alias is allowed.
    assert (await send_unauthenticated(smtp_gate, "relay", ALIAS, rcpt))[1] == 250
    await smtp_gate.received(rcpt)


async def test_relay_account_sealed_by_its_password_is_a_temporary_error(smtp_gate: SmtpGate) -> None:
    rcpt = new_rcpt()
    codes = await send_unauthenticated(smtp_gate, "relay", smtp_gate.upstream_user, rcpt)
    assert codes[:2] == [250, 451]
    await trio.sleep(0.2)
    assert smtp_gate.sink_count(rcpt) == 0


@pytest.mark.parametrize("listener", ["elsewhere", "plain", "smtps"])
async def test_never_an_open_relay_from_outside_the_networks(smtp_gate: SmtpGate, listener: str) -> None:
    await unlock(smtp_gate)  # even with the account's tokens at hand
    rcpt = new_rcpt()
    for sender in (smtp_gate.upstream_user, "forged@example.com", ""):
        codes = await send_unauthenticated(smtp_gate, listener, sender, rcpt)
        assert codes[1] == 530, (sender, codes)
        assert codes[2:] == [503, 503]
    await trio.sleep(0.2)
    assert smtp_gate.sink_count(rcpt) == 0
    refused = [e for e in smtp_gate.server.ctx.events.recent if e["type"] == "smtp.refused"]
    assert refused and all(e["reason"] == "auth_required" for e in refused)


async def test_auth_as_one_user_cannot_claim_anothers_address(nursery: trio.Nursery, tmp_path: Path,
                                                               lab: LabDovecot, oauth_server: LabOAuthServer,
                                                               smtp_seeded: SeededState) -> None:
    gate = await start_smtp_gate(nursery, tmp_path, lab, oauth_server, smtp_seeded,
                                 extra_users={"bob": {"provider": "lab", "upstream_user": "bob@example.com",
                                                      "send_as": ["shared@example.com"]}})
    wire = await gate.login()
    for other in ("bob@example.com", "BOB@example.com", "shared@example.com"):
        code, lines = await wire.command(f"MAIL FROM:<{other}>")
        assert code == 553 and lines[0].startswith(b"553 5.7.1"), other
    await wire.aclose()
