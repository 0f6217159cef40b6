"""The one credential lifecycle (gateway/oauth/lifecycle.py), without an identity provider: the
provider's answer is handed in, the store and the derivations are real."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from gateway.config import Config, parse_config
from gateway.logs import redact
from gateway.oauth import credentials, lifecycle
from gateway.oauth.accounts import STATUS_OK
from gateway.oauth.endpoint import TokenResponse
from gateway.oauth.sealing import unseal
from gateway.oauth.store import REFRESH_TOKEN, StateStore

T = TypeVar("T")
PASSWORD = "a long local password"


class InlineKdf:
    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return fn(*args)


def _config(tmp_path: Path, **provider: object) -> Config:
    return parse_config({
        "server": {"state_dir": "state"},
        "providers": {"up": {"imap": "127.0.0.1:993", "token_url": "http://127.0.0.1:9/token",
                             "authorize_url": "http://127.0.0.1:9/authorize",
                             "client_id": "cid", **provider}},
        "users": {"alice": {"provider": "up", "upstream_user": "alice@example.com"}},
    }, base_dir=tmp_path)


class Grant:
    """The provider's side: counts how often the grant was asked for."""

    def __init__(self, refresh_token: str | None = "refresh-token-for-the-lifecycle") -> None:
        self.refresh_token = refresh_token
        self.asked = 0

    async def __call__(self) -> TokenResponse:
        self.asked += 1
        return TokenResponse("access-token-for-the-lifecycle", 3600.0, self.refresh_token)


async def _authorize(config: Config, store: StateStore, password: str, grant: Grant) -> TokenResponse:
    provider = config.providers["up"]
    return await lifecycle.authorize_account(
        store, InlineKdf(), name="alice", provider=provider, password=password,
        existing=store.account("alice"), daemon_key=await lifecycle.daemon_key(provider),
        obtain=grant,
    )


async def test_a_new_account_is_created_sealed_and_marked_ok(tmp_path: Path) -> None:
    config = _config(tmp_path)
    store = StateStore(config.server.state_dir)
    grant = Grant()
    answer = await _authorize(config, store, PASSWORD, grant)
    assert answer.expires_in == 3600.0 and grant.asked == 1
    record = store.account("alice")
    assert record is not None and record.key_wrapping == "password" and record.provider == "up"
    data_key = credentials.unlock(record, PASSWORD)
    assert data_key is not None
    secret = store.secret("alice", REFRESH_TOKEN)
    assert secret is not None
    assert unseal(data_key, secret.sealed, account="alice", provider="up",
                  kind=REFRESH_TOKEN) == b"refresh-token-for-the-lifecycle"
    status = store.status("alice")
    assert status is not None and status.state == STATUS_OK
    for value in (PASSWORD, "access-token-for-the-lifecycle", "refresh-token-for-the-lifecycle"):
        assert redact(f"saw {value}") == "saw [redacted]"


async def test_a_wrong_password_changes_nothing_and_never_asks_the_provider(tmp_path: Path) -> None:
    config = _config(tmp_path)
    store = StateStore(config.server.state_dir)
    await _authorize(config, store, PASSWORD, Grant())
    before = (store.account("alice"), store.secret("alice", REFRESH_TOKEN))
    grant = Grant("another refresh token")
    with pytest.raises(lifecycle.WrongPassword, match="wrong local password for alice"):
        await _authorize(config, store, "not the password", grant)
    assert grant.asked == 0
    assert (store.account("alice"), store.secret("alice", REFRESH_TOKEN)) == before


async def test_a_missing_refresh_token_stores_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    store = StateStore(config.server.state_dir)
    with pytest.raises(lifecycle.NoRefreshToken):
        await _authorize(config, store, PASSWORD, Grant(refresh_token=None))
    assert store.account("alice") is None


async def test_a_new_key_file_rewraps_the_same_data_key(tmp_path: Path) -> None:
    config = _config(tmp_path)
    store = StateStore(config.server.state_dir)
    await _authorize(config, store, PASSWORD, Grant())
    first = store.account("alice")
    assert first is not None
    data_key = credentials.unlock(first, PASSWORD)
    keyed = _config(tmp_path, key_file="up.key")
    await _authorize(keyed, store, PASSWORD, Grant())
    record = store.account("alice")
    assert record is not None and record.key_wrapping == "keyfile"
    key_file = keyed.providers["up"].key_file
    assert key_file is not None and key_file.exists()  # made on first use
    daemon_key = await lifecycle.daemon_key(keyed.providers["up"])
    assert credentials.unlock(record, PASSWORD, daemon_key=daemon_key) == data_key
