"""AccountManager and Account against a real state store and the lab OAuth server."""

from __future__ import annotations

import sqlite3

import pytest
import trio

from gateway.errors import AuthenticationFailed, ReauthorizationRequired, TemporaryFailure
from gateway.logs import redact
from gateway.oauth import commands
from gateway.oauth.accounts import AccountManager
from gateway.oauth.store import REFRESH_TOKEN, StateStore
from gateway.oauth.tokens import BACKOFF_INITIAL
from tests.fixtures.oauth import (
    PASSWORD,
    UPSTREAM_USER,
    Terminal,
    make_config,
    seed_account,
    state_bytes,
)

pytestmark = pytest.mark.lab


async def test_login_and_token(idp, seeded):
    config, _ = seeded
    manager = AccountManager(config)
    account = await manager.login("alice", PASSWORD)
    assert account.name == "alice" and account.user.upstream_user == UPSTREAM_USER
    token = await account.access_token()
    assert idp.is_active(token)
    assert await account.access_token() == token  # cached
    assert await manager.login(UPSTREAM_USER.upper(), PASSWORD) is account  # by upstream name


async def test_twenty_concurrent_logins_make_one_refresh_request(idp, seeded):
    config, _ = seeded
    manager = AccountManager(config)
    before = len(idp.token_requests)
    tokens: list[str] = []

    async def client() -> None:
        account = await manager.login("alice", PASSWORD)
        tokens.append(await account.access_token())

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(client)
    assert len(tokens) == 20 and len(set(tokens)) == 1
    assert [r["grant_type"] for r in idp.token_requests[before:]] == ["refresh_token"]
    assert manager.kdf.runs == 1  # the other 19 logins were served by the credential cache


async def test_second_login_runs_no_kdf(idp, seeded):
    config, _ = seeded
    manager = AccountManager(config)
    await manager.login("alice", PASSWORD)
    assert manager.kdf.runs == 1
    await manager.login("alice", PASSWORD)
    assert manager.kdf.runs == 1
    with pytest.raises(AuthenticationFailed):
        await manager.login("alice", "not the password")
    assert manager.kdf.runs == 2  # a wrong password is never served from the cache
    await manager.login("alice", PASSWORD)
    assert manager.kdf.runs == 2


async def test_wrong_password_and_unknown_user_fail_alike_and_change_nothing(idp, seeded):
    config, _ = seeded
    state_dir = config.server.state_dir
    manager = AccountManager(config)
    before = state_bytes(state_dir)
    errors = []
    for user, password in [("alice", "wrong password"), ("mallory", PASSWORD),
                           ("alice", ""), ("alice", PASSWORD + "x")]:
        with pytest.raises(AuthenticationFailed) as err:
            await manager.login(user, password)
        errors.append(str(err.value))
    assert len(set(errors)) == 1
    assert state_bytes(state_dir) == before
    # and the tokens are still there and usable
    account = await manager.login("alice", PASSWORD)
    assert idp.is_active(await account.access_token())


async def test_state_file_holds_no_secret_in_clear(idp, seeded):
    config, refresh_token = seeded
    account = await AccountManager(config).login("alice", PASSWORD)
    access_token = await account.access_token()
    for name, data in state_bytes(config.server.state_dir).items():
        for secret in (refresh_token, access_token, PASSWORD):
            assert secret.encode() not in data, name
    db = StateStore(config.server.state_dir).path
    assert db.stat().st_mode & 0o777 == 0o600
    assert config.server.state_dir.stat().st_mode & 0o777 == 0o700


async def test_tokens_are_registered_for_redaction_and_wrong_passwords_are_not(idp, seeded):
    config, _ = seeded
    manager = AccountManager(config)
    account = await manager.login("alice", PASSWORD)
    access_token = await account.access_token()
    # Plain text around it: no redaction pattern applies, only the registration.
    assert redact(f"got {access_token} back") == "got [redacted] back"
    guess = "guessed wrongly 7"
    with pytest.raises(AuthenticationFailed):
        await manager.login("alice", guess)
    assert redact(f"saw {guess}") == f"saw {guess}"  # a guesser cannot censor the log


async def test_rotated_refresh_token_is_persisted_across_a_restart(idp, seeded):
    config, first_refresh = seeded
    idp.rotate_refresh_tokens = True
    idp.access_token_lifetime = 1  # so that the restarted manager cannot reuse the shared one
    account = await AccountManager(config).login("alice", PASSWORD)
    await account.access_token()  # refresh: the IdP rotates and kills the first token
    before = StateStore(config.server.state_dir).secret("alice", REFRESH_TOKEN)
    await trio.sleep(0.6)  # past half the shared access token's life (gateway/oauth/shared_token.py)
    # "restart": a new manager with nothing in memory
    restarted = AccountManager(config)
    account = await restarted.login("alice", PASSWORD)
    token = await account.access_token()
    assert idp.is_active(token)
    grants = [(r["grant_type"], r["error"]) for r in idp.token_requests]
    assert grants[-2:] == [("refresh_token", None), ("refresh_token", None)]
    after = StateStore(config.server.state_dir).secret("alice", REFRESH_TOKEN)
    assert after.sealed != before.sealed  # rotated again, and saved again


async def test_force_refresh_gets_a_new_token_once(idp, seeded):
    config, _ = seeded
    account = await AccountManager(config).login("alice", PASSWORD)
    old = await account.access_token()
    idp.revoke(old)  # the upstream server would now reject it
    results: list[str] = []

    async def retry() -> None:
        results.append(await account.access_token(force_refresh=True))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(retry)
    assert len(set(results)) == 1 and results[0] != old and idp.is_active(results[0])
    assert account.token_mints == 2


async def test_invalid_grant_needs_reauthorization_and_check_says_so(idp, seeded):
    config, refresh_token = seeded
    idp.revoke(refresh_token)
    manager = AccountManager(config)
    account = await manager.login("alice", PASSWORD)
    with pytest.raises(ReauthorizationRequired) as err:
        await account.access_token()
    assert err.value.hint == "run: mailgate authorize alice"
    requests = len(idp.token_requests)
    with pytest.raises(ReauthorizationRequired):  # known dead: no new request to the IdP
        await manager.login("alice", PASSWORD)
    with pytest.raises(ReauthorizationRequired):
        await account.access_token()
    assert len(idp.token_requests) == requests
    out = Terminal()
    assert commands.account_status(config, out) == 1
    assert "invalid_grant" in out.getvalue() and "mailgate authorize alice" in out.getvalue()
    # re-authorizing fixes it without a restart
    _, new_refresh = idp.issue_tokens(UPSTREAM_USER)
    await seed_account(config, new_refresh)
    assert await manager.login("alice", PASSWORD) is account
    assert idp.is_active(await account.access_token())
    out = Terminal()
    assert commands.account_status(config, out) == 0, out.getvalue()


async def test_idp_down_is_temporary_and_backs_off(idp, seeded):
    config, _ = seeded
    account = await AccountManager(config).login("alice", PASSWORD)
    idp.fail_mode = ("status", 503)
    with pytest.raises(TemporaryFailure):
        await account.access_token()
    requests = len(idp.token_requests)
    with pytest.raises(TemporaryFailure, match="next attempt"):
        await account.access_token()
    assert len(idp.token_requests) == requests  # backing off: the IdP was not asked again
    idp.fail_mode = None
    with trio.fail_after(5):
        while True:
            try:
                token = await account.access_token()
                break
            except TemporaryFailure:
                await trio.sleep(0.1)
    assert idp.is_active(token)


async def test_hanging_idp_hits_the_deadline(idp, tmp_path):
    config = make_config(idp, tmp_path, limits={"token_request_timeout": 0.5})
    _, refresh_token = idp.issue_tokens(UPSTREAM_USER)
    await seed_account(config, refresh_token)
    account = await AccountManager(config).login("alice", PASSWORD)
    idp.fail_mode = ("hang", 30)
    with trio.fail_after(10):
        with pytest.raises(TemporaryFailure, match="within 0.5 s"):
            await account.access_token()


async def test_client_credentials_account_mints_on_demand(idp, tmp_path):
    config = make_config(idp, tmp_path, flow="client_credentials")
    out = Terminal()
    assert await commands.authorize_async(config, "alice", password_stdin=True,
                                          stdin=Terminal(PASSWORD + "\n"), stdout=out) == 0
    account = await AccountManager(config).login("alice", PASSWORD)
    assert idp.is_active(await account.access_token())
    assert idp.token_requests[-1]["grant_type"] == "client_credentials"


async def test_key_file_accounts_refresh_without_a_login(idp, tmp_path):
    key_file = tmp_path / "keys" / "lab.key"
    config = make_config(idp, tmp_path / "state", provider={"key_file": str(key_file)})
    _, refresh_token = idp.issue_tokens(UPSTREAM_USER)
    await seed_account(config, refresh_token)
    assert key_file.stat().st_mode & 0o777 == 0o600
    manager = AccountManager(config)
    token = await manager.account("alice").access_token()  # unattended: no password needed
    assert idp.is_active(token)
    with pytest.raises(AuthenticationFailed):
        await manager.login("alice", "wrong password")
    assert (await manager.login("alice", PASSWORD)).name == "alice"


async def test_password_sealed_accounts_need_a_login_first(idp, seeded):
    config, _ = seeded
    with pytest.raises(AuthenticationFailed, match="must log in"):
        await AccountManager(config).account("alice").access_token()


async def test_store_schema_is_what_the_docs_say(seeded):
    config, _ = seeded
    db = sqlite3.connect(StateStore(config.server.state_dir).path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    db.close()
    assert tables == {"accounts", "secrets", "status", "trusted_addresses", "meta"}


async def test_token_events_and_config_reload(idp, seeded, tmp_path):
    from gateway.events import EventBus

    config, refresh_token = seeded
    events = EventBus()
    manager = AccountManager(config, events=events)
    account = await manager.login("alice", PASSWORD)
    await account.access_token()
    assert [(e["type"], e["user"]) for e in events.recent] == [("token.refreshed", "alice")]
    # SIGHUP with the same config keeps the account (and its cached token) ...
    manager.update_config(config)
    assert manager.account("alice") is account
    # ... a changed provider gives new sessions a new Account that is still unlocked
    changed = make_config(idp, config.server.state_dir, provider={"scopes": ["mail", "more"]})
    manager.update_config(changed)
    fresh = manager.account("alice")
    assert fresh is not account and fresh.unlocked and fresh.provider.scopes == ["mail", "more"]
    idp.revoke(refresh_token)
    with pytest.raises(ReauthorizationRequired):
        await fresh.access_token()
    assert events.recent[-1]["type"] == "token.failed"
    assert events.recent[-1]["reason"] == "reauthorization_required"
    for event in events.recent:
        assert refresh_token not in repr(event)


async def test_nothing_secret_is_logged_at_any_level(idp, tmp_path, caplog):
    caplog.set_level("DEBUG")
    config = make_config(idp, tmp_path)
    _, refresh_token = idp.issue_tokens(UPSTREAM_USER)
    await seed_account(config, refresh_token)
    idp.rotate_refresh_tokens = True
    manager = AccountManager(config)
    account = await manager.login("alice", PASSWORD)
    await account.access_token()
    await account.access_token(force_refresh=True)
    with pytest.raises(AuthenticationFailed):
        await manager.login("alice", "a wrong password")
    idp.fail_mode = ("status", 503)
    with pytest.raises(TemporaryFailure):
        await account.access_token(force_refresh=True)
    assert "rotated refresh token saved" in caplog.text  # the log does say what happened
    for secret in [*idp.all_secrets(), PASSWORD, "a wrong password"]:
        assert secret not in caplog.text


async def test_an_unreadable_store_is_a_temporary_failure(idp, seeded):
    config, _ = seeded
    manager = AccountManager(config)
    account = await manager.login("alice", PASSWORD)
    state_dir = config.server.state_dir
    moved = state_dir.with_name("moved-away")
    state_dir.rename(moved)
    try:
        with pytest.raises(TemporaryFailure, match="credential store"):
            await account.access_token()
        with pytest.raises(TemporaryFailure, match="credential store"):
            await manager.login("alice", PASSWORD)
    finally:
        moved.rename(state_dir)
    await trio.sleep(BACKOFF_INITIAL)  # the token cache backs off after a temporary failure
    assert idp.is_active(await account.access_token())
