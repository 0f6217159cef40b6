"""Notifications end to end, against the lab: the real ``mailgate serve`` (or the real gateway
in-process), real logins through Dovecot and the lab OAuth server, a real webhook server and a
real notify command; ``mailgate accounts`` as an admin runs it; a certificate renewed on disk and
served after SIGHUP without dropping a session.
"""

from __future__ import annotations

import datetime
import hashlib
import signal
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from gateway.config import load_config
from tests.fixtures.gateway import start_gateway
from tests.lab import LabDovecot, LabOAuthServer
from tests.fixtures.notify import WebhookReceiver, notify_command, pages, wait_for
from tests.fixtures.admin import lab_config, seed_account
from tests.fixtures.process import (
    ALICE_PASSWORD,
    Process,
    imap_login,
    start_process,
    stop_process,
    write_config,
)
from tests.fixtures.process import run
from tests.fixtures.imap import Wire

pytestmark = pytest.mark.lab

LIMITS = {"auth_failure_delay": 0, "token_request_timeout": 5, "upstream_connect_timeout": 5,
          "notify_webhook_backoff": 0.2}


def notify_config(tmp_path: Path, lab: LabDovecot, oauth: LabOAuthServer, upstream_user: str,
                  hook: WebhookReceiver, **notify: Any) -> tuple[dict[str, Any], Path]:
    command, out = notify_command(tmp_path)
    raw = lab_config(tmp_path, lab, oauth, {"alice": upstream_user})
    raw["limits"] = LIMITS
    raw["notify"] = {"command": command, "webhook_url": hook.url, **notify}
    return raw, out


async def login_answer(proc: Process, config_file: Path) -> bytes:
    w = await proc.imap_wire(config_file)
    try:
        return await imap_login(w, "alice", ALICE_PASSWORD)
    finally:
        await w.aclose()


async def test_revoked_grant_notifies_once_and_accounts_says_what_to_do(
    tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer, running: list[Process],  # noqa: F811
) -> None:
    upstream_user = lab.new_user("alice")
    config_file = tmp_path / "mailgate.toml"
    with WebhookReceiver() as hook:
        raw, out = notify_config(tmp_path, lab, oauth_server, upstream_user, hook)
        write_config(config_file, raw)
        _, refresh_token = oauth_server.issue_tokens(upstream_user)
        await seed_account(load_config(config_file), "alice", refresh_token, ALICE_PASSWORD)
        oauth_server.access_token_lifetime = 2  # so that the next login needs the grant again
        proc = await start_process(config_file, tmp_path / "mailgate.log")
        running.append(proc)
        assert (await login_answer(proc, config_file)).startswith(b"L OK")

        # The user revokes mailgate's access at the provider; phones keep trying to log in.
        oauth_server.revoke(refresh_token)
        await trio.sleep(2.1)  # the access token mailgate holds has expired
        for _ in range(4):
            answer = await login_answer(proc, config_file)
            assert answer.startswith(b"L NO"), answer
        await proc.wait_log(r"notify account.reauthorization_required")
        await wait_for(lambda: len(hook.notifications) >= 1 and len(pages(out)) >= 1)
        await trio.sleep(1.5)  # room for a (wrong) second notification to arrive
        assert len(hook.notifications) == 1 and len(pages(out)) == 1, (hook.notifications, pages(out))
        note = hook.notifications[0]
        assert pages(out) == [note]
        assert note["type"] == "account.reauthorization_required"
        assert (note["user"], note["provider"], note["detail"]) == ("alice", "lab", "invalid_grant")
        assert note["action"].startswith("run: mailgate authorize alice")
        assert refresh_token not in repr(note) and ALICE_PASSWORD not in repr(note)

        # The admin, on the server, without a browser.
        result = await trio.to_thread.run_sync(lambda: run("--config", str(config_file), "accounts"))
        assert result.returncode == 1, result.stderr
        text = result.stdout
        assert f"alice: lab (authorization_code), upstream user {upstream_user}" in text
        assert "invalid_grant" in text and "to do:      run: mailgate authorize alice" in text
        assert "last error:" in text and "upstream:   ok (last login" in text
        as_json = await trio.to_thread.run_sync(
            lambda: run("--config", str(config_file), "accounts", "--json"))
        assert '"todo": "run: mailgate authorize alice' in as_json.stdout
        assert await stop_process(proc) == 0


class Switch:
    """A TCP forwarder in front of the lab's IMAPS port that can be switched off (connections
    are then closed at once, as by a dead upstream or a firewall)."""

    def __init__(self, lab: LabDovecot):
        self.lab = lab
        self.up = True
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        if not self.up:
            await client.aclose()
            return
        async with client, await trio.open_tcp_stream(self.lab.host, self.lab.ports["imaps"]) as server:
            async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
                try:
                    while data := await a.receive_some(65536):
                        await b.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, server)
                nursery.start_soon(pump, server, client)


async def test_flapping_upstream_notifies_failing_once_and_recovered_once(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
) -> None:
    upstream_user = lab.new_user("flap")
    switch = Switch(lab)
    await nursery.start(switch.serve)
    with WebhookReceiver() as hook:
        raw, out = notify_config(tmp_path, lab, oauth_server, upstream_user, hook,
                                 upstream_failing_after=1.0)
        raw["providers"]["lab"]["imap"] = f"127.0.0.1:{switch.port}"
        raw["admin"] = {"enabled": False}
        config_file = tmp_path / "mailgate.toml"
        write_config(config_file, raw)
        config = load_config(config_file)
        await seed_account(config, "alice", oauth_server.issue_tokens(upstream_user)[1], ALICE_PASSWORD)
        server = await start_gateway(nursery, config)
        assert server.ctx.notifier is not None
        await nursery.start(server.ctx.notifier.run)
        host, port = server.addresses[0]
        ctx = ssl.create_default_context(cafile=str(config.tls.cert_file.with_name("mailgate-ca.pem")))

        async def login() -> bytes:
            tcp = await trio.open_tcp_stream(host, port)
            w = Wire(trio.SSLStream(tcp, ctx, server_hostname="localhost"), ctx)
            try:
                return await imap_login(w, "alice", ALICE_PASSWORD)
            finally:
                await w.aclose()

        def kinds() -> list[str]:
            return [n["type"] for n in hook.notifications]

        assert (await login()).startswith(b"L OK")
        # Blips shorter than the threshold: nobody is paged.
        for _ in range(3):
            switch.up = False
            assert (await login()).startswith(b"L NO")
            switch.up = True
            assert (await login()).startswith(b"L OK")
        # Down for longer than the threshold, with clients retrying all along.
        switch.up = False
        with trio.move_on_after(2.5):
            while True:
                assert (await login()).startswith(b"L NO [UNAVAILABLE]")
                await trio.sleep(0.2)
        await wait_for(lambda: kinds() == ["upstream.failing"])
        failing = hook.notifications[0]
        assert failing["user"] == "alice" and failing["upstream"] == f"127.0.0.1:{switch.port}"
        assert f"127.0.0.1:{switch.port}" in failing["detail"]  # the upstream's own words
        switch.up = True
        assert (await login()).startswith(b"L OK")
        await wait_for(lambda: kinds() == ["upstream.failing", "upstream.recovered"])
        # More flapping within the threshold after the recovery: still nothing new.
        for _ in range(3):
            switch.up = False
            assert (await login()).startswith(b"L NO")
            switch.up = True
            assert (await login()).startswith(b"L OK")
        await trio.sleep(1.5)
        assert kinds() == ["upstream.failing", "upstream.recovered"]
        await wait_for(lambda: [p["type"] for p in pages(out)] == kinds())
        nursery.cancel_scope.cancel()


async def served_certificate(address: tuple[str, int], ctx: ssl.SSLContext) -> str:
    tcp = await trio.open_tcp_stream(*address)
    stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    await stream.do_handshake()
    der = stream.getpeercert(binary_form=True)
    await stream.aclose()
    assert der is not None
    return hashlib.sha256(der).hexdigest()


async def test_expiring_certificate_notifies_and_a_renewed_one_is_served_after_sighup(
    tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer, running: list[Process],  # noqa: F811
) -> None:
    """What an ACME client's deploy hook does: new files on disk, then SIGHUP."""
    ca = trustme.CA()
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    certs = tmp_path / "certs"
    soon = ca.issue_cert("localhost", "127.0.0.1", not_after=datetime.datetime.now(
        datetime.timezone.utc) + datetime.timedelta(days=3))
    certs.mkdir()
    soon.private_key_pem.write_to_path(str(certs / "mailgate.key"))
    soon.cert_chain_pems[0].write_to_path(str(certs / "mailgate.pem"))
    upstream_user = lab.new_user("renew")
    config_file = tmp_path / "mailgate.toml"
    with WebhookReceiver() as hook:
        raw, out = notify_config(tmp_path, lab, oauth_server, upstream_user, hook,
                                 certificate_expiry_days=14)
        raw["tls"] = {"cert_file": "certs/mailgate.pem", "key_file": "certs/mailgate.key"}
        write_config(config_file, raw)
        await seed_account(load_config(config_file), "alice",
                           oauth_server.issue_tokens(upstream_user)[1], ALICE_PASSWORD)
        proc = await start_process(config_file, tmp_path / "mailgate.log")
        running.append(proc)

        await wait_for(lambda: [n["type"] for n in hook.notifications] == ["certificate.expiring"])
        note = hook.notifications[0]
        assert note["file"] == str(certs / "mailgate.pem") and 2.5 < note["days_left"] <= 3
        assert "SIGHUP" in note["action"]
        await wait_for(lambda: pages(out) == [note])
        old = await served_certificate(proc.imap, client_ctx)

        # A client logged in before the renewal.
        tcp = await trio.open_tcp_stream(*proc.imap)
        session = Wire(trio.SSLStream(tcp, client_ctx, server_hostname="localhost"), client_ctx)
        assert (await imap_login(session, "alice", ALICE_PASSWORD)).startswith(b"L OK")
        assert (await session.command(b"S SELECT INBOX"))[-1].startswith(b"S OK")

        # certbot renews: the files are replaced (atomically), the deploy hook sends SIGHUP.
        renewed = ca.issue_cert("localhost", "127.0.0.1", not_after=datetime.datetime.now(
            datetime.timezone.utc) + datetime.timedelta(days=90))
        for name, blob in (("mailgate.key", renewed.private_key_pem),
                           ("mailgate.pem", renewed.cert_chain_pems[0])):
            blob.write_to_path(str(certs / (name + ".new")))
            (certs / (name + ".new")).replace(certs / name)
        proc.process.send_signal(signal.SIGHUP)
        await proc.wait_log(r"SIGHUP: configuration reloaded")
        new = await served_certificate(proc.imap, client_ctx)
        assert new != old
        assert new == hashlib.sha256(ssl.PEM_cert_to_DER_cert(
            renewed.cert_chain_pems[0].bytes().decode())).hexdigest()
        # The session that started before goes on, on its old TLS connection.
        assert (await session.command(b"N NOOP"))[-1].startswith(b"N OK")
        assert (await session.command(b"T STATUS INBOX (MESSAGES)"))[-1].startswith(b"T OK")
        await session.command(b"Z LOGOUT")
        await session.aclose()
        await trio.sleep(0.5)
        assert [n["type"] for n in hook.notifications] == ["certificate.expiring"]  # renewed: quiet
        assert await stop_process(proc) == 0
