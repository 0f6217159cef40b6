"""Real IMAP clients through mailgate: curl (IMAPS and STARTTLS), mbsync, and 200 sessions at once."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from tests.fixtures.imap import Gate, create_mailbox, logged_in, quoted, start_seeded_gate
from tests.lab import LabDovecot, seed
from tests.lab.corpus import CORPUS

pytestmark = pytest.mark.lab

CLIENT_TIMEOUT = 60
LOGIN_WAVE = 20


def run(args: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, timeout=CLIENT_TIMEOUT, check=False, **kw)  # type: ignore[call-overload]


def ca_file(gate: Gate) -> str:
    return str(gate.config.tls.cert_file.with_name("mailgate-ca.pem"))


async def seed_corpus(gate: Gate, names: list[str]) -> list[bytes]:
    await trio.to_thread.run_sync(create_mailbox, gate)
    for name in names:
        await trio.to_thread.run_sync(seed.append, gate.lab, gate.upstream_user, CORPUS[name], gate.mailbox)
    return [
        await trio.to_thread.run_sync(seed.fetch_raw, gate.lab, gate.upstream_user, uid, gate.mailbox)
        for uid in range(1, len(names) + 1)
    ]


async def test_curl_imaps_and_starttls(gate: Gate) -> None:
    assert shutil.which("curl"), "curl is not installed (apt-get install curl)"
    expected = await seed_corpus(gate, ["simple", "dot_lines", "eight_bit_headers"])
    user = f"{gate.user}:{gate.password}"
    for uid, body in enumerate(expected, start=1):
        for url, extra in [
            (f"imaps://localhost:{gate.imaps[1]}/{gate.mailbox};UID={uid}", []),  # AUTHENTICATE PLAIN
            (f"imaps://localhost:{gate.imaps[1]}/{gate.mailbox};UID={uid}", ["--login-options", "AUTH=LOGIN"]),  # SASL LOGIN
            (f"imap://localhost:{gate.starttls[1]}/{gate.mailbox};UID={uid}", ["--ssl-reqd"]),  # STARTTLS
        ]:
            done = await trio.to_thread.run_sync(
                lambda url=url, extra=extra: run(["curl", "-sS", "--cacert", ca_file(gate), "-u", user, *extra, url])
            )
            assert done.returncode == 0, (url, extra, done.stderr)
            assert done.stdout == body, url


async def test_mbsync_pulls_the_mailbox(gate: Gate, tmp_path: Path) -> None:
    assert shutil.which("mbsync"), "mbsync is not installed (apt-get install isync)"
    names = ["simple", "bare_lf", "utf8_headers", "nested_multipart", "no_final_newline"]
    expected = await seed_corpus(gate, names)
    home = tmp_path / "home"
    maildir = home / "Mail"
    maildir.mkdir(parents=True)
    (home / "pw").write_text(gate.password)
    (home / ".mbsyncrc").write_text(
        f"""IMAPAccount gate
Host localhost
Port {gate.imaps[1]}
User {gate.user}
PassCmd "cat {home / 'pw'}"
SSLType IMAPS
CertificateFile {ca_file(gate)}

IMAPStore gate-remote
Account gate

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel pull
Far :gate-remote:{gate.mailbox}
Near :local:{gate.mailbox}
Sync Pull
Create Near
"""
    )
    env = {**os.environ, "HOME": str(home)}
    done = await trio.to_thread.run_sync(lambda: run(["mbsync", "-c", str(home / ".mbsyncrc"), "pull"], env=env))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    files = sorted((maildir / gate.mailbox).glob("*/*"), key=lambda p: int(p.name.split(",U=")[1].split(",")[0].split(":")[0]))
    # mbsync stores messages with LF line ends and its own X-TUID header; nothing else may differ.
    got = [re.sub(rb"X-TUID: [^\n]*\n", b"", p.read_bytes(), count=1) for p in files]
    assert got == [m.replace(b"\r\n", b"\n") for m in expected]


async def test_200_concurrent_logged_in_sessions(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                                                 oauth_server, seeded_state) -> None:
    sessions = 200
    gate = await start_seeded_gate(
        nursery, tmp_path, lab, oauth_server, seeded_state,
        max_connections_per_ip=sessions + 10, upstream_connections_per_account=sessions + 10,
    )
    await trio.to_thread.run_sync(create_mailbox, gate)
    ready = trio.Event()
    logged = 0
    results: list[bytes] = []

    # Sessions log in a few at a time (the test's clients share the gateway's CPU), then all
    # 200 work at once. The client leg is cleartext (allowed from loopback) to spare CPU; the
    # upstream leg is TLS as always.
    login_slots = trio.CapacityLimiter(LOGIN_WAVE)

    async def session(n: int) -> None:
        nonlocal logged
        async with login_slots:
            w = await logged_in(gate, "plain")
        logged += 1
        if logged == sessions:
            ready.set()
        await ready.wait()  # all 200 are logged in at the same time
        lines = await w.command(b"s%d EXAMINE %s" % (n, quoted(gate.mailbox)))
        results.append(lines[-1].split(b" ")[1])
        await w.send(b"z LOGOUT\r\n")
        await w.until_tagged(b"z")
        await w.aclose()

    with trio.fail_after(120):
        async with trio.open_nursery() as clients:
            for n in range(sessions):
                clients.start_soon(session, n)
    assert results == [b"OK"] * sessions
