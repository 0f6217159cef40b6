"""``mailgate authorize`` / ``passwd`` / ``check`` logic, and one token all the way to Dovecot."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import trio

from gateway.errors import AuthenticationFailed
from gateway.oauth import commands
from gateway.oauth.accounts import AccountManager
from gateway.oauth.store import REFRESH_TOKEN, StateStore
from gateway.protocol.sasl import b64encode, xoauth2_initial_response
from tests.fixtures.oauth import PASSWORD, UPSTREAM_USER, Terminal, make_config, state_bytes
from tests.lab import LabDovecot, LabOAuthServer

pytestmark = pytest.mark.lab
NEW_PASSWORD = "a brand new password"


async def _authorize(config, stdin_text: str, **options) -> tuple[int, str]:
    out = Terminal()
    status = await commands.authorize_async(
        config, "alice", password_stdin=True, stdin=Terminal(stdin_text), stdout=out, **options
    )
    return status, out.getvalue()


async def _passwd(config, stdin_text: str, **options) -> tuple[int, str]:
    out = Terminal()
    status = await commands.passwd_async(
        config, "alice", password_stdin=True, stdin=Terminal(stdin_text), stdout=out, **options
    )
    return status, out.getvalue()


async def test_authorize_imports_a_refresh_token_and_never_prints_it(idp, tmp_path):
    config = make_config(idp, tmp_path)
    _, refresh_token = idp.issue_tokens(UPSTREAM_USER)
    status, output = await _authorize(config, f"{PASSWORD}\n{refresh_token}\n",
                                      refresh_token_stdin=True)
    assert status == 0 and "alice: authorized" in output
    for secret in idp.all_secrets():
        assert secret not in output
    assert StateStore(config.server.state_dir).secret("alice", REFRESH_TOKEN) is not None


async def test_authorize_with_the_loopback_flow(idp, tmp_path):
    config = make_config(idp, tmp_path)
    out = Terminal()
    async with trio.open_nursery() as nursery:
        statuses: list[int] = []

        async def run() -> None:
            statuses.append(await commands.authorize_async(
                config, "alice", password_stdin=True, stdin=Terminal(PASSWORD + "\n"),
                stdout=out))

        nursery.start_soon(run)
        await out.wait_for("Waiting")
        async with httpx.AsyncClient(follow_redirects=True, trust_env=False, timeout=5) as b:
            await b.get(out.line_after("approve the access"))
    assert statuses == [0], out.getvalue()
    account = await AccountManager(config).login("alice", PASSWORD)
    assert idp.is_active(await account.access_token())


async def test_authorize_refuses_a_bad_token_or_password_and_changes_nothing(idp, tmp_path):
    config = make_config(idp, tmp_path)
    status, output = await _authorize(config, f"{PASSWORD}\nrt-bogus\n", refresh_token_stdin=True)
    assert status == 1 and "invalid_grant" in output
    assert StateStore(config.server.state_dir).account("alice") is None
    _, refresh_token = idp.issue_tokens(UPSTREAM_USER)
    assert (await _authorize(config, f"{PASSWORD}\n{refresh_token}\n",
                             refresh_token_stdin=True))[0] == 0
    before = state_bytes(config.server.state_dir)
    _, other = idp.issue_tokens(UPSTREAM_USER)
    status, output = await _authorize(config, f"wrong password\n{other}\n",
                                      refresh_token_stdin=True)
    assert status == 1 and "wrong local password" in output
    assert state_bytes(config.server.state_dir) == before
    assert (await _authorize(config, "short\n", refresh_token_stdin=True))[0] != 0


async def test_passwd_changes_the_password_and_keeps_the_grant(idp, tmp_path):
    config = make_config(idp, tmp_path)
    _, refresh_token = idp.issue_tokens(UPSTREAM_USER)
    await _authorize(config, f"{PASSWORD}\n{refresh_token}\n", refresh_token_stdin=True)
    before = state_bytes(config.server.state_dir)
    status, output = await _passwd(config, f"not it at all\n{NEW_PASSWORD}\n")
    assert status == 1 and "nothing was changed" in output
    assert state_bytes(config.server.state_dir) == before
    status, output = await _passwd(config, f"{PASSWORD}\n{NEW_PASSWORD}\n")
    assert status == 0, output
    manager = AccountManager(config)
    with pytest.raises(AuthenticationFailed):
        await manager.login("alice", PASSWORD)
    account = await manager.login("alice", NEW_PASSWORD)
    assert idp.is_active(await account.access_token())


async def test_passwd_reset_discards_the_grant_and_check_says_what_to_run(idp, tmp_path):
    config = make_config(idp, tmp_path)
    out = Terminal()
    assert commands.account_status(config, out) == 1
    assert "not set up: run: mailgate authorize alice" in out.getvalue()
    _, refresh_token = idp.issue_tokens(UPSTREAM_USER)
    await _authorize(config, f"{PASSWORD}\n{refresh_token}\n", refresh_token_stdin=True)
    out = Terminal()
    assert commands.account_status(config, out) == 0 and "alice: ok" in out.getvalue()
    status, output = await _passwd(config, f"{NEW_PASSWORD}\n", reset=True)
    assert status == 0 and "mailgate authorize alice" in output
    out = Terminal()
    assert commands.account_status(config, out) == 1
    assert "no authorization stored: run: mailgate authorize alice" in out.getvalue()


async def test_unknown_user_is_a_usage_error(idp, tmp_path):
    config = make_config(idp, tmp_path)
    out = Terminal()
    status = await commands.authorize_async(config, "nobody", password_stdin=True,
                                            stdin=Terminal(PASSWORD + "\n"), stdout=out)
    assert status == 2 and "no user 'nobody'" in out.getvalue()


def test_blocking_entry_points_run_trio_themselves(idp, tmp_path):
    config = make_config(idp, tmp_path)
    _, refresh_token = idp.issue_tokens(UPSTREAM_USER)
    out = Terminal()
    assert commands.authorize(config, "alice", refresh_token_stdin=True, password_stdin=True,
                              stdin=Terminal(f"{PASSWORD}\n{refresh_token}\n"), stdout=out) == 0
    assert commands.passwd(config, "alice", password_stdin=True,
                           stdin=Terminal(f"{PASSWORD}\n{NEW_PASSWORD}\n"), stdout=out) == 0


async def _imap_xoauth2(lab: LabDovecot, user: str, token: str) -> bytes:
    """A raw IMAP XOAUTH2 login on the lab's implicit-TLS port; returns the tagged answer."""
    ctx = ssl.create_default_context(cafile=str(lab.ca_file))
    stream = await trio.open_ssl_over_tcp_stream(lab.host, lab.ports["imaps"], ssl_context=ctx,
                                                 https_compatible=True)
    buffer = b""

    async def line() -> bytes:
        nonlocal buffer
        while b"\r\n" not in buffer:
            buffer += await stream.receive_some(65536)
        head, _, buffer = buffer.partition(b"\r\n")
        return head

    with trio.fail_after(10):
        assert (await line()).startswith(b"* OK")
        await stream.send_all(b"a1 AUTHENTICATE XOAUTH2 "
                              + b64encode(xoauth2_initial_response(user, token)) + b"\r\n")
        while not (answer := await line()).startswith(b"a1 "):
            if answer.startswith(b"+"):
                await stream.send_all(b"\r\n")
        await stream.aclose()
    return answer


async def test_token_from_the_account_logs_in_to_dovecot(
    oauth_server: LabOAuthServer, lab: LabDovecot, lab_user: str, tmp_path: Path
):
    config = make_config(oauth_server, tmp_path, upstream_user=lab_user)
    _, refresh_token = oauth_server.issue_tokens(lab_user)
    status, output = await _authorize(config, f"{PASSWORD}\n{refresh_token}\n",
                                      refresh_token_stdin=True)
    assert status == 0, output
    account = await AccountManager(config).login("alice", PASSWORD)
    token = await account.access_token()
    assert (await _imap_xoauth2(lab, lab_user, token)).startswith(b"a1 OK")
    oauth_server.revoke(token)
    assert (await _imap_xoauth2(lab, lab_user, token)).startswith(b"a1 NO")
    fresh = await account.access_token(force_refresh=True)
    assert (await _imap_xoauth2(lab, lab_user, fresh)).startswith(b"a1 OK")
