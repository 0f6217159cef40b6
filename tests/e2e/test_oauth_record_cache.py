"""AccountManager keeps account records in memory until the state store changes."""

from __future__ import annotations

import pytest

from gateway.errors import AuthenticationFailed
from gateway.oauth.accounts import AccountManager
from gateway.oauth.store import StateStore
from tests.fixtures.oauth import PASSWORD, UPSTREAM_USER, seed_account

pytestmark = pytest.mark.lab


class CountingStore(StateStore):
    """The real store, counting the account-record reads that reach SQLite."""

    reads = 0

    def account(self, name):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().account(name)


async def test_logins_read_the_record_once_until_the_store_changes(idp, seeded):
    config, _ = seeded
    store = CountingStore(config.server.state_dir)
    manager = AccountManager(config, store=store)
    for _ in range(3):
        await manager.login("alice", PASSWORD)
    assert store.reads == 1
    # Another writer (another StateStore, as `mailgate authorize` or the admin plane) removes
    # the account: the very next login sees it.
    StateStore(config.server.state_dir).delete_account("alice")
    with pytest.raises(AuthenticationFailed):
        await manager.login("alice", PASSWORD)
    assert store.reads == 2
    # Authorized again with a new password: the old one fails, the new one works.
    _, refresh_token = idp.issue_tokens(UPSTREAM_USER)
    await seed_account(config, refresh_token, password="a new local password")
    with pytest.raises(AuthenticationFailed):
        await manager.login("alice", PASSWORD)
    account = await manager.login("alice", "a new local password")
    assert account.name == "alice"


async def test_a_config_reload_drops_the_cached_records(idp, seeded):
    config, _ = seeded
    store = CountingStore(config.server.state_dir)
    manager = AccountManager(config, store=store)
    await manager.login("alice", PASSWORD)
    manager.update_config(config)
    await manager.login("alice", PASSWORD)
    assert store.reads == 2


async def test_the_change_stamp_follows_every_commit(seeded):
    config, _ = seeded
    store = StateStore(config.server.state_dir)
    before = store.change_stamp()
    assert store.change_stamp() == before  # reads change nothing
    store.account("alice")
    assert store.change_stamp() == before
    for n in range(3):  # commits within one clock tick still change it
        store.set_status("alice", "ok", f"detail {n}")
        now = store.change_stamp()
        assert now != before
        before = now
