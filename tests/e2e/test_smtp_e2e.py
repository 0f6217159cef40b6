"""SMTP submission end to end: a real mailgate in front of the lab's real submission server
(Dovecot checking the account's OAuth token, relaying to the sink)."""

from __future__ import annotations

import logging
import smtplib
import ssl

import pytest
import trio

from tests.lab import LabDovecot
from tests.fixtures.smtp import (
    ALIAS,
    SmtpGate,
    SmtpWire,
    new_rcpt,
    plain,
    strip_trace,
)

pytestmark = pytest.mark.lab


async def test_smtplib_sends_through_the_account(smtp_gate: SmtpGate) -> None:
    ok1, ok2, refused = new_rcpt(), new_rcpt(), new_rcpt("refuse")
    body = b"From: alice\r\nSubject: hello\r\n\r\nHi.\r\n.dot line\r\n"

    def send() -> dict[str, tuple[int, bytes]]:
        with smtp_gate.smtplib() as client:
            client.login(smtp_gate.user, smtp_gate.password)
            return client.sendmail(smtp_gate.upstream_user, [ok1, refused, ok2], body)

    result = await trio.to_thread.run_sync(send)
    # Per-recipient failures stay per-recipient, with the upstream's codes.
    assert list(result) == [refused]
    code, text = result[refused]
    assert code == 550 and b"5.1.1" in text
    [stored] = await smtp_gate.received(ok1)
    assert stored.rcpt_tos == (ok1, ok2) and stored.mail_from == smtp_gate.upstream_user
    assert strip_trace(stored.data) == body


async def test_ehlo_and_auth_rules(smtp_gate: SmtpGate) -> None:
    wire = await smtp_gate.wire("smtps")
    code, lines = await wire.command("EHLO client.example")
    assert code == 250
    ext = [line[4:].strip() for line in lines[1:]]
    assert ext[0].startswith(b"SIZE ")
    for word in (b"8BITMIME", b"PIPELINING", b"ENHANCEDSTATUSCODES", b"CHUNKING", b"AUTH PLAIN LOGIN"):
        assert word in ext, ext
    assert b"STARTTLS" not in ext and b"SMTPUTF8" not in ext  # Dovecot offers no SMTPUTF8
    assert (await wire.command(f"MAIL FROM:<{smtp_gate.upstream_user}>"))[0] == 530
    assert (await wire.command("AUTH PLAIN " + plain("alice", "wrong")))[0] == 535
    assert (await wire.command("AUTH PLAIN " + plain("alice", smtp_gate.password)))[0] == 235
    assert (await wire.command("AUTH PLAIN " + plain("alice", smtp_gate.password)))[0] == 503
    await wire.aclose()

    # Before STARTTLS: no AUTH offered, and refused.
    wire = await smtp_gate.wire("submission")
    code, lines = await wire.command("EHLO client.example")
    ext = [line[4:].strip() for line in lines[1:]]
    assert b"STARTTLS" in ext and not any(e.startswith(b"AUTH") for e in ext)
    code, lines = await wire.command("AUTH PLAIN " + plain("alice", smtp_gate.password))
    assert code == 538 and lines[0].startswith(b"538 5.7.11")
    # STARTTLS discards what was pipelined after it (RFC 3207 §4.2).
    await wire.send(b"STARTTLS\r\nMAIL FROM:<x@example.com>\r\n")
    assert (await wire.reply())[0] == 220
    await wire.start_tls()
    code, lines = await wire.command("EHLO again")
    assert b"250 AUTH PLAIN LOGIN\r\n" in lines
    code, lines = await wire.command("AUTH LOGIN")
    assert (code, lines) == (334, [b"334 VXNlcm5hbWU6\r\n"])
    assert (await wire.command(plain_part("alice")))[0] == 334
    assert (await wire.command(plain_part(smtp_gate.password)))[0] == 235
    await wire.aclose()


def plain_part(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


async def test_sender_must_be_the_accounts_address_or_an_alias(smtp_gate: SmtpGate) -> None:
    wire = await smtp_gate.login()
    code, lines = await wire.command("MAIL FROM:<someone.else@example.com>")
    assert code == 553 and lines[0].startswith(b"553 5.7.1")
    assert (await wire.command("MAIL FROM:<>"))[0] == 553  # no bounces from clients
    assert (await wire.command(f"MAIL FROM:<{ALIAS.upper()}>"))[0] == 250
    assert (await wire.command("RSET"))[0] == 250
    assert (await wire.command(f"MAIL FROM:<{smtp_gate.upstream_user}>"))[0] == 250
    await wire.aclose()


AWKWARD = {
    "dot_lines": b"Subject: dots\r\n\r\n..\r\n..leading\r\n...\r\nend\r\n",
    "bare_lf": b"Subject: lf\nX-Mixed: yes\r\n\nline one\nline two\r\n.x\nlast\r\n",
    "eight_bit": b"Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: text/plain; charset=latin-1\r\n\r\ncaf\xe9 \xff\xfe\r\n",
    "long_line": b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\n",
    "no_final_newline": b"Subject: nofinal\r\n\r\nno end",
}


async def raw_send(wire: SmtpWire, sender: str, rcpt: str, data: bytes) -> tuple[int, list[bytes]]:
    """One transaction with the client's exact DATA octets (already stuffed, CRLF.CRLF added)."""
    assert (await wire.command(f"MAIL FROM:<{sender}>"))[0] == 250
    assert (await wire.command(f"RCPT TO:<{rcpt}>"))[0] == 250
    assert (await wire.command("DATA"))[0] == 354
    await wire.send(data)
    return await wire.reply()


def stuffed(body: bytes) -> bytes:
    """``body`` as a client puts it on the wire: stuffed, ended with CRLF.CRLF."""
    lines = body.split(b"\r\n")
    out = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    return out + (b"" if out.endswith(b"\r\n") else b"\r\n") + b".\r\n"


async def direct_submission(lab: LabDovecot, user: str, token: str, rcpt: str, data: bytes) -> None:
    """The same octets sent straight to the lab's submission server (the reference)."""
    def send() -> None:
        ctx = ssl.create_default_context(cafile=str(lab.ca_file))
        with smtplib.SMTP_SSL(lab.host, lab.ports["submissions"], context=ctx, timeout=10) as client:
            client.ehlo("direct")
            code, _ = client.docmd("AUTH", "XOAUTH2 " + plain_xoauth2(user, token))
            assert code == 235
            assert client.docmd(f"MAIL FROM:<{user}>")[0] == 250
            assert client.docmd(f"RCPT TO:<{rcpt}>")[0] == 250
            assert client.docmd("DATA")[0] == 354
            client.send(data)
            assert client.getreply()[0] == 250

    await trio.to_thread.run_sync(send)


def plain_xoauth2(user: str, token: str) -> str:
    from gateway.protocol import sasl

    return sasl.b64encode(sasl.xoauth2_initial_response(user, token)).decode()


@pytest.mark.parametrize("name", sorted(AWKWARD))
async def test_awkward_bodies_arrive_as_sent_directly(smtp_gate: SmtpGate, name: str) -> None:
    data = stuffed(AWKWARD[name])
    via, direct = new_rcpt(), new_rcpt()
    wire = await smtp_gate.login()
    code, lines = await raw_send(wire, smtp_gate.upstream_user, via, data)
    assert code == 250, lines
    await wire.aclose()
    token, _ = smtp_gate.oauth.issue_tokens(smtp_gate.upstream_user)
    await direct_submission(smtp_gate.lab, smtp_gate.upstream_user, token, direct, data)
    [through] = await smtp_gate.received(via)
    [reference] = await smtp_gate.received(direct)
    assert strip_trace(through.data) == strip_trace(reference.data)


async def test_pipelined_transaction(smtp_gate: SmtpGate) -> None:
    rcpt1, rcpt2 = new_rcpt(), new_rcpt()
    wire = await smtp_gate.login()
    await wire.send(f"MAIL FROM:<{smtp_gate.upstream_user}>\r\nRCPT TO:<{rcpt1}>\r\n"
                    f"RCPT TO:<{rcpt2}>\r\nDATA\r\n".encode())
    assert [(await wire.reply())[0] for _ in range(4)] == [250, 250, 250, 354]
    await wire.send(b"Subject: piped\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
    assert [(await wire.reply())[0] for _ in range(3)] == [250, 250, 221]
    await wire.aclose()
    [stored] = await smtp_gate.received(rcpt1)
    assert stored.rcpt_tos == (rcpt1, rcpt2)


async def test_bdat(smtp_gate: SmtpGate) -> None:
    rcpt = new_rcpt()
    body = b"Subject: chunks\r\n\r\n.not stuffed in BDAT\r\n"
    wire = await smtp_gate.login()
    assert (await wire.command(f"MAIL FROM:<{smtp_gate.upstream_user}>"))[0] == 250
    assert (await wire.command(f"RCPT TO:<{rcpt}>"))[0] == 250
    await wire.send(b"BDAT 10\r\n" + body[:10])
    assert (await wire.reply())[0] == 250
    await wire.send(b"BDAT %d LAST\r\n" % (len(body) - 10) + body[10:])
    code, lines = await wire.reply()
    assert code == 250, lines
    await wire.aclose()
    [stored] = await smtp_gate.received(rcpt)
    assert strip_trace(stored.data) == body


async def test_many_recipients_and_the_recipient_limit(smtp_gate: SmtpGate) -> None:
    rcpts = [new_rcpt() for _ in range(30)]
    wire = await smtp_gate.login()
    assert (await wire.command(f"MAIL FROM:<{smtp_gate.upstream_user}>"))[0] == 250
    for rcpt in rcpts:
        assert (await wire.command(f"RCPT TO:<{rcpt}>"))[0] == 250
    assert (await wire.command("DATA"))[0] == 354
    await wire.send(b"Subject: many\r\n\r\nx\r\n.\r\n")
    assert (await wire.reply())[0] == 250
    await wire.aclose()
    [stored] = await smtp_gate.received(rcpts[-1])
    assert stored.rcpt_tos == tuple(rcpts)


async def test_size_limits(nursery: trio.Nursery, tmp_path, lab, oauth_server, smtp_seeded) -> None:  # type: ignore[no-untyped-def]
    from tests.fixtures.smtp import start_smtp_gate

    gate = await start_smtp_gate(nursery, tmp_path, lab, oauth_server, smtp_seeded,
                                 smtp_max_message_size=2000, smtp_max_recipients=2)
    rcpt = new_rcpt()
    wire = await gate.login()
    code, lines = await wire.command("EHLO again")
    assert b"250-SIZE 2000\r\n" in lines
    code, lines = await wire.command(f"MAIL FROM:<{gate.upstream_user}> SIZE=5000")
    assert code == 552 and lines[0].startswith(b"552 5.3.4")
    assert (await wire.command(f"MAIL FROM:<{gate.upstream_user}>"))[0] == 250
    assert (await wire.command(f"RCPT TO:<{rcpt}>"))[0] == 250
    assert (await wire.command(f"RCPT TO:<{new_rcpt()}>"))[0] == 250
    code, lines = await wire.command(f"RCPT TO:<{new_rcpt()}>")
    assert code == 452 and lines[0].startswith(b"452 4.5.3")
    assert (await wire.command("DATA"))[0] == 354
    await wire.send(b"Subject: big\r\n\r\n" + b"y" * 3000 + b"\r\n.\r\n")
    code, lines = await wire.reply()
    assert code == 552
    # The session goes on, and the refused message never reached the sink.
    assert (await wire.command("NOOP"))[0] == 250
    await wire.aclose()
    await trio.sleep(0.3)
    assert gate.sink_count(rcpt) == 0


async def test_bare_lf_dot_line_is_refused_and_nothing_is_sent(smtp_gate: SmtpGate) -> None:
    rcpt = new_rcpt()
    wire = await smtp_gate.login()
    data = b"Subject: smuggle\r\n\r\nhi\n.\r\nMAIL FROM:<x@example.com>\r\n.\r\n"
    code, lines = await raw_send(wire, smtp_gate.upstream_user, rcpt, data)
    assert code == 550 and lines[0].startswith(b"550 5.6.11")
    await wire.aclose()
    await trio.sleep(0.3)
    assert smtp_gate.sink_count(rcpt) == 0


async def test_log_line_metrics_and_status(smtp_gate: SmtpGate, caplog: pytest.LogCaptureFixture) -> None:
    from gateway.admin.metrics import LiveState, Metrics
    from gateway.admin.pages import status_fragment
    from gateway.admin.status import AccountActivity, snapshot

    caplog.set_level(logging.DEBUG, logger="mailgate")
    metrics = Metrics()
    smtp_gate.server.ctx.events.observe(metrics)
    ok, refused = new_rcpt(), new_rcpt("refuse")
    body = b"Subject: qzx-subject-words\r\n\r\nqzx-body-words\r\n"
    wire = await smtp_gate.login()
    assert (await wire.command(f"MAIL FROM:<{smtp_gate.upstream_user}>"))[0] == 250
    assert (await wire.command(f"RCPT TO:<{ok}>"))[0] == 250
    assert (await wire.command(f"RCPT TO:<{refused}>"))[0] == 550
    assert (await wire.command("DATA"))[0] == 354
    await wire.send(body + b".\r\n")
    assert (await wire.reply())[0] == 250
    # The session shows on the status page while it is open.
    snap = await snapshot(smtp_gate.server, smtp_gate.config.listeners, AccountActivity())
    [session] = [s for s in snap["sessions"] if s["protocol"] == "smtp" and s["user"] == "alice"]
    assert session["tls"] is True
    await wire.command("QUIT")
    await wire.aclose()

    [line] = [r for r in caplog.records if r.getMessage().startswith("smtp message:")]
    text = line.getMessage()
    assert "user=alice" in text and "rcpts=1 rcpts_refused=1" in text
    assert f"size={len(body)}" in text and "upstream_reply=250 2.0.0" in text and "outcome=sent" in text
    everything = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("mailgate"))
    assert "qzx-" not in everything and ok not in everything and smtp_gate.password not in everything

    live = LiveState({}, {}, {}, False, 0, 0.0)
    rendered = metrics.render(live)
    assert 'mailgate_smtp_messages_total{outcome="sent"} 1' in rendered
    assert f"mailgate_smtp_message_bytes_total {len(body)}" in rendered
    assert 'mailgate_smtp_upstream_replies_total{class="2xx"} 1' in rendered
    assert 'mailgate_sessions{protocol="smtp"}' in rendered

    # An explained provider answer shows on the status page with its advice.
    assert smtp_gate.server.ctx.smtp is not None
    smtp_gate.server.ctx.smtp.note_problem("alice", "535 5.7.139 disabled", "smtp_auth_disabled", "enable it")
    snap = await snapshot(smtp_gate.server, smtp_gate.config.listeners, AccountActivity())
    [alice] = snap["accounts"]
    assert alice["sending_problem"]["key"] == "smtp_auth_disabled"
    assert "sending: smtp_auth_disabled" in status_fragment(snap)
