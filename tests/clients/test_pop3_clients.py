"""Real POP3 clients through mailgate: Python's poplib, curl (pop3s:// and STLS), fetchmail,
getmail6. Each reads the lab Dovecot through the gateway and the results are checked upstream."""

from __future__ import annotations

import os
import poplib
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.fixtures.pop3 import PopGate

pytestmark = pytest.mark.lab

CLIENT_TIMEOUT = 30.0


def message(i: int) -> bytes:
    return (
        b"From: sender@example.com\r\nTo: alice@example.com\r\nSubject: client test %d\r\n"
        b"Message-ID: <client-%d@example.com>\r\n\r\nbody of message %d\r\n.leading dot\r\n" % (i, i, i)
    )


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed")
    return path


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A scratch directory an unprivileged user can write (getmail refuses to deliver as root)."""
    path = Path(tempfile.mkdtemp(prefix="mailgate-pop3-client-"))
    os.chmod(path, 0o755)
    if os.geteuid() == 0:
        owner = pwd.getpwnam("nobody")
        os.chown(path, owner.pw_uid, owner.pw_gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fetchmail_string(text: str) -> str:
    """Escape for a single-quoted fetchmailrc string (ASCII only: \\xHH for other bytes)."""
    out = []
    for byte in text.encode():
        char = chr(byte)
        if char == "\\":
            out.append("\\\\")
        elif char == "'":
            out.append("\\x27")
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


async def run(cmd: list[str], **kwargs: object) -> trio.CompletedProcess:
    with trio.fail_after(CLIENT_TIMEOUT):
        return await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False, **kwargs)


async def test_poplib(pop_gate: PopGate) -> None:
    uids = [await pop_gate.append(message(i)) for i in range(3)]

    def session() -> tuple[list[bytes], list[bytes], list[bytes]]:
        client = poplib.POP3_SSL("localhost", pop_gate.port, context=pop_gate.ssl_context, timeout=10)
        try:
            assert "TOP" in client.capa()
            client.user(pop_gate.user)
            client.pass_(pop_gate.password)
            assert client.stat() == (3, 3 * len(message(0)))
            listing = client.list()[1]
            uidl = client.uidl()[1]
            lines = client.retr(2)[1]
            assert client.top(3, 1)[1][-1] == b"body of message 2"
            client.dele(1)
            client.quit()
        except BaseException:
            client.close()
            raise
        return listing, uidl, lines

    listing, uidl, lines = await trio.to_thread.run_sync(session)
    assert listing == [b"%d %d" % (n, len(message(0))) for n in (1, 2, 3)]
    assert len(set(uidl)) == 3
    assert b"\r\n".join(lines) + b"\r\n" == message(1)
    assert await pop_gate.uids() == uids[1:]
    assert "\\Seen" in await pop_gate.flags(uids[1])


async def test_curl_pop3s_and_stls(pop_gate: PopGate, tmp_path: Path) -> None:
    curl = need("curl")
    await pop_gate.append(message(1))
    await pop_gate.append(message(2))
    ca = str(pop_gate.config.tls.cert_file.with_name("mailgate-ca.pem"))
    auth = ["-u", f"{pop_gate.user}:{pop_gate.password}"]
    port = pop_gate.port
    listing = await run([curl, "-sS", "--cacert", ca, *auth, f"pop3s://localhost:{port}/"])
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout == b"1 %d\r\n2 %d\r\n" % (len(message(1)), len(message(2)))
    retr = await run([curl, "-sS", "--cacert", ca, *auth, f"pop3s://localhost:{port}/2"])
    assert retr.returncode == 0, retr.stderr
    assert retr.stdout == message(2)
    stls_port = pop_gate.address("stls")[1]
    retr = await run([curl, "-sS", "--ssl-reqd", "--cacert", ca, *auth, f"pop3://localhost:{stls_port}/1"])
    assert retr.returncode == 0, retr.stderr
    assert retr.stdout == message(1)


async def test_fetchmail_downloads_and_deletes(pop_gate: PopGate, nobody_dir: Path) -> None:
    fetchmail = need("fetchmail")
    for i in range(3):
        await pop_gate.append(message(i))
    out = nobody_dir / "delivered.mbox"
    ca = pop_gate.config.tls.cert_file.with_name("mailgate-ca.pem")
    rc = nobody_dir / "fetchmailrc"
    password = fetchmail_string(pop_gate.password)
    rc.write_text(
        "set no syslog\n"
        f'poll localhost with proto POP3 port {pop_gate.port} timeout 20\n'
        f'  user "{pop_gate.user}" there with password \'{password}\' is "root" here\n'
        f'  options ssl sslcertck sslcertfile "{ca}" fetchall\n'
        f"  mda \"/bin/sh -c 'cat >> {out}'\"\n"
    )
    rc.chmod(0o600)
    env = {**os.environ, "FETCHMAILHOME": str(nobody_dir), "HOME": str(nobody_dir)}
    result = await run([fetchmail, "--nodetach", "-f", str(rc)], env=env)
    assert result.returncode == 0, (result.stdout + result.stderr, rc.read_text())
    delivered = out.read_bytes()
    for i in range(3):
        assert b"Message-ID: <client-%d@example.com>" % i in delivered
        assert b"body of message %d\n.leading dot\n" % i in delivered.replace(b"\r\n", b"\n")
    assert await pop_gate.uids() == []


async def test_getmail_downloads_and_keeps(pop_gate: PopGate, nobody_dir: Path) -> None:
    getmail = need("getmail")
    for i in range(2):
        await pop_gate.append(message(i))
    maildir = nobody_dir / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    if os.geteuid() == 0:
        owner = pwd.getpwnam("nobody")
        for path in (maildir, *(maildir / s for s in ("new", "cur", "tmp"))):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    ca = pop_gate.config.tls.cert_file.with_name("mailgate-ca.pem")
    rc = nobody_dir / "getmailrc"
    rc.write_text(
        "[retriever]\n"
        "type = SimplePOP3SSLRetriever\n"
        "server = localhost\n"
        f"port = {pop_gate.port}\n"
        f"username = {pop_gate.user}\n"
        f"password = {pop_gate.password}\n"
        f"ca_certs = {ca}\n"
        "[destination]\n"
        "type = Maildir\n"
        f"path = {maildir}/\n"
        "user = nobody\n"
        "[options]\n"
        "read_all = false\n"
        "delete = false\n"
        "verbose = 0\n"
    )
    result = await run([getmail, "--getmaildir", str(nobody_dir), "--rcfile", str(rc)])
    assert result.returncode == 0, result.stdout + result.stderr
    delivered = sorted((maildir / "new").iterdir())
    assert len(delivered) == 2
    bodies = b"".join(p.read_bytes() for p in delivered).replace(b"\r\n", b"\n")
    for i in range(2):
        assert b"body of message %d\n.leading dot\n" % i in bodies
    assert len(await pop_gate.uids()) == 2  # delete = false: the messages stay
    # A second run sees the same UIDLs and downloads nothing new.
    result = await run([getmail, "--getmaildir", str(nobody_dir), "--rcfile", str(rc)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list((maildir / "new").iterdir())) == 2
