"""Real SMTP clients through mailgate: Python's smtplib (STARTTLS and implicit TLS, a 20 MB
attachment), swaks, msmtp, curl (smtps:// and smtp:// with STARTTLS) and mutt's smtp_url. Each
message is checked at the lab's sink, behind the real submission server."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
from email.message import EmailMessage
from pathlib import Path

import pytest
import trio

from tests.fixtures.smtp import SmtpGate, new_rcpt, strip_trace

pytestmark = pytest.mark.lab

CLIENT_TIMEOUT = 60.0


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed (.ci/setup installs it)")
    return path


async def run(cmd: list[str], **kwargs: object) -> trio.CompletedProcess[bytes]:
    with trio.fail_after(CLIENT_TIMEOUT):
        return await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False, **kwargs)


def ca_file(gate: SmtpGate) -> Path:
    return gate.config.tls.cert_file.with_name("mailgate-ca.pem")


def message(subject: str, rcpt: str, sender: str, body: str = "Hello.\n.dot line\n") -> bytes:
    return (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\n"
            + body.replace("\n", "\r\n")).encode()


@pytest.mark.parametrize("listener", ["smtps", "submission"])
async def test_smtplib(smtp_gate: SmtpGate, listener: str) -> None:
    rcpt = new_rcpt()
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = smtp_gate.upstream_user, rcpt, "smtplib"
    msg.set_content("caf\u00e9\n.leading dot\n")

    def send() -> None:
        with smtp_gate.smtplib(listener) as client:
            if listener == "submission":
                client.starttls(context=smtp_gate.ssl_context)
            client.login(smtp_gate.user, smtp_gate.password)
            client.send_message(msg)

    await trio.to_thread.run_sync(send)
    [stored] = await smtp_gate.received(rcpt)
    parsed = email.message_from_bytes(strip_trace(stored.data), policy=email.policy.default)
    assert parsed["Subject"] == "smtplib"
    assert parsed.get_content().replace("\r\n", "\n") == "caf\u00e9\n.leading dot\n"


@pytest.mark.slow
async def test_smtplib_20mb_attachment(smtp_gate: SmtpGate) -> None:
    rcpt = new_rcpt()
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = smtp_gate.upstream_user, rcpt, "big"
    msg.set_content("see attachment\n")
    payload = os.urandom(15 * 1024 * 1024)  # ~20 MB once base64-encoded
    msg.add_attachment(payload, maintype="application", subtype="octet-stream", filename="big.bin")
    raw = msg.as_bytes(policy=email.policy.SMTP)
    assert len(raw) > 20_000_000

    def send() -> None:
        with smtp_gate.smtplib("smtps") as client:
            client.login(smtp_gate.user, smtp_gate.password)
            client.sendmail(smtp_gate.upstream_user, [rcpt], raw)

    await trio.to_thread.run_sync(send)
    [stored] = await smtp_gate.received(rcpt)
    assert strip_trace(stored.data) == raw


async def test_swaks(smtp_gate: SmtpGate, tmp_path: Path) -> None:
    rcpt, refused = new_rcpt(), new_rcpt("refuse")
    body = tmp_path / "mail.eml"
    body.write_bytes(message("swaks", rcpt, smtp_gate.upstream_user))
    result = await run([
        need("swaks"), "--server", "localhost", "--port", str(smtp_gate.port("smtps")), "--tls-on-connect",
        "--tls-verify", "--tls-ca-path", str(ca_file(smtp_gate)),
        "--auth", "LOGIN", "--auth-user", smtp_gate.user, "--auth-password", smtp_gate.password,
        "--from", smtp_gate.upstream_user, "--to", f"{rcpt},{refused}", "--data", f"@{body}",
    ])
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    assert "<~* 550 5.0.0 <refuse" in out, out  # the refused recipient, per recipient
    [stored] = await smtp_gate.received(rcpt)
    # swaks ends the data with CRLF . CRLF after the file's own final CRLF: one empty line more.
    assert strip_trace(stored.data) == body.read_bytes() + b"\r\n"


async def test_msmtp(smtp_gate: SmtpGate, tmp_path: Path) -> None:
    rcpt = new_rcpt()
    config = tmp_path / "msmtprc"
    config.write_text(
        "account gate\n"
        "host localhost\n"
        f"port {smtp_gate.port('submission')}\n"
        "tls on\ntls_starttls on\n"
        f"tls_trust_file {ca_file(smtp_gate)}\n"
        "auth plain\n"
        f"user {smtp_gate.user}\npassword {smtp_gate.password}\n"
        f"from {smtp_gate.upstream_user}\n"
        "account default : gate\n"
    )
    config.chmod(0o600)
    raw = message("msmtp", rcpt, smtp_gate.upstream_user)
    result = await run([need("msmtp"), "-C", str(config), rcpt], stdin=raw)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    [stored] = await smtp_gate.received(rcpt)
    assert strip_trace(stored.data).endswith(raw)  # msmtp puts a Date: header on top


@pytest.mark.parametrize("scheme", ["smtps", "smtp"])
async def test_curl(smtp_gate: SmtpGate, tmp_path: Path, scheme: str) -> None:
    rcpt = new_rcpt()
    raw = message("curl", rcpt, smtp_gate.upstream_user)
    path = tmp_path / "mail.eml"
    path.write_bytes(raw)
    listener = "smtps" if scheme == "smtps" else "submission"
    result = await run([
        need("curl"), "--silent", "--show-error", f"{scheme}://localhost:{smtp_gate.port(listener)}",
        *([] if scheme == "smtps" else ["--ssl-reqd"]), "--cacert", str(ca_file(smtp_gate)),
        "--user", f"{smtp_gate.user}:{smtp_gate.password}", "--mail-from", smtp_gate.upstream_user,
        "--mail-rcpt", rcpt, "--upload-file", str(path),
    ])
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    [stored] = await smtp_gate.received(rcpt)
    assert strip_trace(stored.data) == raw


async def test_mutt_smtp_url(smtp_gate: SmtpGate, tmp_path: Path) -> None:
    rcpt = new_rcpt()
    home = tmp_path / "home"
    home.mkdir()
    muttrc = home / "muttrc"
    muttrc.write_text(
        f'set smtp_url="smtps://{smtp_gate.user}@localhost:{smtp_gate.port("smtps")}/"\n'
        f'set smtp_pass="{smtp_gate.password}"\n'
        f'set ssl_ca_certificates_file="{ca_file(smtp_gate)}"\n'
        f'set from="{smtp_gate.upstream_user}"\nset use_from=yes\nset envelope_from=yes\n'
        'set record=""\nset copy=no\nset folder="/tmp"\nset spoolfile="/dev/null"\n'
    )
    env = {**os.environ, "HOME": str(home), "TERM": "dumb"}
    result = await run([need("mutt"), "-n", "-F", str(muttrc), "-s", "from mutt", rcpt],
                       stdin=b"sent by mutt\n", env=env)
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    [stored] = await smtp_gate.received(rcpt)
    assert stored.mail_from == smtp_gate.upstream_user
    assert b"Subject: from mutt" in stored.data and b"sent by mutt" in stored.data
