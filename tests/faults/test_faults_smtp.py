"""SMTP submission under faults: the upstream submission server dropping, stalling, throttling
or closing (through a TLS-terminating fault proxy in front of the lab Dovecot), the token
revoked, the identity provider down, and the client vanishing mid-DATA. The rule throughout:
the client never gets 250 for a message the upstream did not take, and nothing half sent is
ever completed upstream."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from tests.faults.proxy import FaultProxy
from tests.lab import LabDovecot, LabOAuthServer
from tests.fixtures.imap import SeededState, seed_account
from tests.fixtures.smtp import (
    PASSWORD,
    SmtpGate,
    SmtpWire,
    new_rcpt,
    smtp_config,
    start_smtp_gate,
)
from tests.fixtures.gateway import start_gateway

pytestmark = pytest.mark.lab


@dataclass
class SmtpRig:
    gate: SmtpGate
    proxy: FaultProxy


async def start_proxy(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot) -> tuple[FaultProxy, Path]:
    ca = trustme.CA()
    ca_file = tmp_path / "proxy-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_tls)
    client_tls = ssl.create_default_context(cafile=str(lab.ca_file))
    proxy = FaultProxy((lab.host, lab.ports["submissions"]), server_tls=server_tls,
                       client_tls=client_tls, server_hostname="localhost")
    await nursery.start(proxy.run)
    return proxy, ca_file


@pytest.fixture
async def rig(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
              smtp_seeded: SeededState) -> SmtpRig:
    proxy, ca_file = await start_proxy(nursery, tmp_path, lab)
    gate = await start_smtp_gate(nursery, tmp_path, lab, oauth_server, smtp_seeded,
                                 smtp=proxy.address, ca_file=ca_file, smtp_data_timeout=3)
    return SmtpRig(gate, proxy)


async def transaction(wire: SmtpWire, sender: str, rcpt: str, data: bytes) -> list[int]:
    """MAIL, RCPT, DATA, the data; every code the client saw, stopping at the first failure."""
    codes = []
    for cmd, want in ((f"MAIL FROM:<{sender}>", 250), (f"RCPT TO:<{rcpt}>", 250), ("DATA", 354)):
        code, _ = await wire.command(cmd)
        codes.append(code)
        if code != want:
            return codes
    await wire.send(data)
    codes.append((await wire.reply())[0])
    return codes


MESSAGE = b"Subject: fault\r\n\r\n" + b"line of the body\r\n" * 200 + b".\r\n"


async def assert_not_delivered(gate: SmtpGate, rcpt: str) -> None:
    await trio.sleep(0.5)
    assert gate.sink_count(rcpt) == 0


async def test_upstream_drops_before_data(rig: SmtpRig) -> None:
    rcpt = new_rcpt()
    rig.proxy.arm("up", "drop", rb"^DATA\r\n")
    wire = await rig.gate.login()
    codes = await transaction(wire, rig.gate.upstream_user, rcpt, MESSAGE)
    assert codes[:2] == [250, 250] and 400 <= codes[2] < 500
    # The next transaction opens a new upstream connection and goes through.
    rcpt2 = new_rcpt()
    assert await transaction(wire, rig.gate.upstream_user, rcpt2, MESSAGE) == [250, 250, 354, 250]
    await wire.aclose()
    await rig.gate.received(rcpt2)
    await assert_not_delivered(rig.gate, rcpt)


async def test_upstream_drops_during_data(rig: SmtpRig) -> None:
    rcpt = new_rcpt()
    rig.proxy.arm("up", "drop", rb"^line of the body", after=100)
    wire = await rig.gate.login()
    codes = await transaction(wire, rig.gate.upstream_user, rcpt, MESSAGE)
    assert codes[:3] == [250, 250, 354] and 400 <= codes[3] < 500, codes
    await wire.aclose()
    await assert_not_delivered(rig.gate, rcpt)


async def test_upstream_stalls_during_data(rig: SmtpRig) -> None:
    rcpt = new_rcpt()
    rig.proxy.arm("up", "stall", rb"^line of the body", after=50)  # the end never arrives upstream
    wire = await rig.gate.login()
    with trio.fail_after(10):  # limits.smtp_data_timeout is 3 s here
        codes = await transaction(wire, rig.gate.upstream_user, rcpt, MESSAGE)
    assert codes[:3] == [250, 250, 354] and 400 <= codes[3] < 500, codes
    await wire.aclose()
    await assert_not_delivered(rig.gate, rcpt)


async def test_final_reply_lost_is_never_a_250(rig: SmtpRig) -> None:
    # The upstream took the message but its answer never arrives: the client is told 4xx (it
    # may send again: the duplicate RFC 5321 §4.1.1.4 accepts rather than a lost message).
    rcpt = new_rcpt()
    rig.proxy.arm("down", "stall", rb"Ok: stored")  # the reply's line end never comes
    wire = await rig.gate.login()
    with trio.fail_after(10):
        codes = await transaction(wire, rig.gate.upstream_user, rcpt, MESSAGE)
    assert codes[:3] == [250, 250, 354] and 400 <= codes[3] < 500, codes
    await wire.aclose()


async def test_client_drops_mid_data_nothing_is_sent(rig: SmtpRig) -> None:
    rcpt = new_rcpt()
    wire = await rig.gate.login()
    for cmd, want in ((f"MAIL FROM:<{rig.gate.upstream_user}>", 250), (f"RCPT TO:<{rcpt}>", 250), ("DATA", 354)):
        assert (await wire.command(cmd))[0] == want
    await wire.send(MESSAGE[:2000] + b"\r\n.")  # almost the end of data, then gone
    await wire.aclose()
    with trio.fail_after(10):
        await rig.proxy.wait_idle()  # mailgate closed its upstream connection
    await assert_not_delivered(rig.gate, rcpt)


async def test_upstream_421_at_mail(rig: SmtpRig) -> None:
    rig.proxy.arm("up", "reply", rb"^MAIL FROM", reply=b"421 4.7.0 Too many connections, closing\r\n", close=True)
    wire = await rig.gate.login()
    code, lines = await wire.command(f"MAIL FROM:<{rig.gate.upstream_user}>")
    assert code == 451 and lines[0].startswith(b"451 4.7.0")
    # The client's session goes on; a fresh upstream connection serves the retry.
    rcpt = new_rcpt()
    assert await transaction(wire, rig.gate.upstream_user, rcpt, MESSAGE) == [250, 250, 354, 250]
    await wire.aclose()


async def test_throttled_login_is_temporary_and_explained(rig: SmtpRig) -> None:
    rig.proxy.arm("up", "reply", rb"^AUTH ", reply=b"451 4.7.0 Too many login attempts, try later\r\n")
    wire = await rig.gate.login()
    code, lines = await wire.command(f"MAIL FROM:<{rig.gate.upstream_user}>")
    assert code == 451, lines
    await wire.aclose()
    smtp = rig.gate.server.ctx.smtp
    assert smtp is not None and smtp.problems["alice"].key == "throttled"


async def test_smtp_auth_disabled_is_a_refused_feature(rig: SmtpRig) -> None:
    # Microsoft 365 with SMTP AUTH off for the mailbox: the client is refused for good, and the
    # event carries the feature, which the notifier turns into one account.feature_refused.
    rig.proxy.arm("up", "reply", rb"^AUTH ",
                  reply=b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox\r\n")
    wire = await rig.gate.login()
    code, lines = await wire.command(f"MAIL FROM:<{rig.gate.upstream_user}>")
    assert 500 <= code < 600, lines
    await wire.aclose()
    smtp = rig.gate.server.ctx.smtp
    assert smtp is not None and smtp.problems["alice"].key == "smtp_auth_disabled"
    refused = [e for e in rig.gate.server.ctx.events.recent
               if e["type"] == "upstream.error" and e.get("protocol") == "smtp"]
    assert refused and refused[-1]["feature"] == "smtp"


async def test_throttled_recipient_stays_per_recipient(rig: SmtpRig) -> None:
    ok, throttled = new_rcpt(), new_rcpt("throttle")
    wire = await rig.gate.login()
    assert (await wire.command(f"MAIL FROM:<{rig.gate.upstream_user}>"))[0] == 250
    code, lines = await wire.command(f"RCPT TO:<{throttled}>")
    assert code == 451 and b"4.7.0" in lines[0]
    assert (await wire.command(f"RCPT TO:<{ok}>"))[0] == 250
    assert (await wire.command("DATA"))[0] == 354
    await wire.send(MESSAGE)
    assert (await wire.reply())[0] == 250
    await wire.aclose()
    [stored] = await rig.gate.received(ok)
    assert stored.rcpt_tos == (ok,)


async def fresh_gate(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth: LabOAuthServer,
                     **options: Any) -> tuple[SmtpGate, str]:
    """A gateway on an account of its own (these tests break its grant)."""
    from tests.fixtures.smtp import SmtpGate as Gate

    upstream_user = lab.new_user("smtpfault")
    config = smtp_config(tmp_path, lab, oauth, upstream_user, **options)
    _, refresh_token = oauth.issue_tokens(upstream_user)
    await seed_account(config, refresh_token, PASSWORD)
    server = await start_gateway(nursery, config)
    return Gate(config=config, server=server, lab=lab, oauth=oauth, upstream_user=upstream_user), refresh_token


async def test_revoked_grant_is_a_permanent_error(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                                                  oauth_server: LabOAuthServer) -> None:
    gate, refresh_token = await fresh_gate(nursery, tmp_path, lab, oauth_server)
    oauth_server.revoke(refresh_token)
    rcpt = new_rcpt()
    wire = await gate.login()
    code, lines = await wire.command(f"MAIL FROM:<{gate.upstream_user}>")
    assert code == 554 and b"authorized again" in lines[0]
    await wire.aclose()
    smtp = gate.server.ctx.smtp
    assert smtp is not None and smtp.problems["alice"].key == "reauthorization_required"
    assert "re-authorize to send" in smtp.problems["alice"].advice
    await assert_not_delivered(gate, rcpt)


async def test_identity_provider_down_is_temporary(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                                                   oauth_server: LabOAuthServer, smtp_seeded: SeededState) -> None:
    gate = await start_smtp_gate(nursery, tmp_path, lab, oauth_server, smtp_seeded)
    oauth_server.fail_mode = ("status", 503)
    wire = await gate.login()
    code, lines = await wire.command(f"MAIL FROM:<{gate.upstream_user}>")
    assert 400 <= code < 500, lines
    oauth_server.fail_mode = None
    await trio.sleep(1.5)  # the token cache's back-off after an IdP failure (1 s at first)
    assert (await wire.command(f"MAIL FROM:<{gate.upstream_user}>"))[0] == 250  # retried: fine
    await wire.aclose()


async def test_upstream_421_at_data_ends_the_transaction(rig: SmtpRig) -> None:
    rig.proxy.arm("up", "reply", rb"^DATA", reply=b"421 4.4.2 Closing transmission channel\r\n", close=True)
    rcpt = new_rcpt()
    wire = await rig.gate.login()
    codes = await transaction(wire, rig.gate.upstream_user, rcpt, MESSAGE)
    assert codes == [250, 250, 451]
    assert (await wire.command("DATA"))[0] == 503  # no transaction any more; the session lives
    assert await transaction(wire, rig.gate.upstream_user, rcpt, MESSAGE) == [250, 250, 354, 250]
    await wire.aclose()
    assert len(await rig.gate.received(rcpt)) == 1
