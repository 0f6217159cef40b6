"""The credential store contract (gateway.ports.CredentialStore), asserted on both
implementations: the SQLite file (gateway/oauth/store.py) and PostgreSQL
(gateway/oauth/pg_store.py, against a real PostgreSQL server)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from gateway.frontends.pop3_listing import Listing, Listings, Pop3StateFiles
from gateway.oauth.pg_store import PgStore
from gateway.oauth.store import (
    REFRESH_TOKEN,
    AccountRecord,
    SealedSecret,
    StateStore,
    StoreError,
)
from gateway.ports import CredentialStore, Pop3StateStore

RECORD = AccountRecord("alice", "lab", "$argon2id$v=19$m=1,t=1,p=1$c2FsdA$aGFzaA", "password",
                       '{"n": 16384}', b"\x00wrapped\xffkey", created=1000.0)

StoreFactory = Callable[[], CredentialStore]


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores on one shared place (as separate processes or instances would)."""
    opened: list[PgStore] = []
    make: StoreFactory
    if request.param == "sqlite":
        def make() -> CredentialStore:
            return StateStore(tmp_path / "state")
    else:
        make = _pg_stores(request, opened)
    yield make
    for store in opened:
        store.close()


def _pg_stores(request: pytest.FixtureRequest, opened: list[PgStore]) -> Callable[[], PgStore]:
    """Opens PostgreSQL stores on the test's database, each one closed by the fixture."""
    url = request.getfixturevalue("pg_url")

    def make() -> PgStore:
        store = PgStore(url, max_connections=4, timeout=3)
        opened.append(store)
        return store
    return make


def test_records_secrets_and_status_round_trip(make_store: StoreFactory) -> None:
    store = make_store()
    assert store.account("alice") is None and store.account_names() == []
    store.save_account(RECORD, {REFRESH_TOKEN: SealedSecret("lab", b"\x01sealed\x00", 0.0)})
    got = store.account("alice")
    assert got is not None
    assert (got.name, got.provider, got.password_hash, got.key_wrapping, got.kdf,
            got.wrapped_key, got.created) == (RECORD.name, RECORD.provider, RECORD.password_hash,
                                              RECORD.key_wrapping, RECORD.kdf,
                                              RECORD.wrapped_key, 1000.0)
    assert got.updated >= time.time() - 60
    secret = store.secret("alice", REFRESH_TOKEN)
    assert secret is not None and (secret.provider, secret.sealed) == ("lab", b"\x01sealed\x00")
    store.save_secret("alice", REFRESH_TOKEN, "lab", b"\x02rotated")
    store.save_secret("alice", "access_token", "lab", b"\x03access")
    assert store.secret("alice", REFRESH_TOKEN).sealed == b"\x02rotated"  # type: ignore[union-attr]
    assert store.secret("alice", "access_token").sealed == b"\x03access"  # type: ignore[union-attr]
    store.set_status("alice", "needs_reauthorization", "invalid_grant")
    status = store.status("alice")
    assert status is not None and (status.state, status.detail) == ("needs_reauthorization",
                                                                    "invalid_grant")
    store.set_status("alice", "ok")
    assert store.status("alice").state == "ok"  # type: ignore[union-attr]
    # Another handle on the same place sees it all (another process, another instance).
    other = make_store()
    assert other.account_names() == ["alice"]
    # Saving with secrets replaces every secret of the account (a new data key).
    other.save_account(RECORD, {REFRESH_TOKEN: SealedSecret("lab", b"\x04new", 0.0)})
    assert store.secret("alice", "access_token") is None
    assert store.account("alice").created == 1000.0  # type: ignore[union-attr]
    store.save_account(AccountRecord("bob", "lab", "h", "keyfile", None, b"k"))
    assert store.account_names() == ["alice", "bob"]
    store.delete_account("alice")
    assert store.account("alice") is None and store.secret("alice") is None
    assert store.status("alice") is None and store.account_names() == ["bob"]


def test_a_write_changes_the_stamp_seen_by_another_handle(make_store: StoreFactory) -> None:
    writer, reader = make_store(), make_store()

    def stamp() -> object:
        deadline = time.monotonic() + 5
        while True:  # PostgreSQL's listener connects in the background
            try:
                return reader.change_stamp()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    before = stamp()
    assert stamp() == before  # nothing written: unchanged
    writer.save_account(RECORD)
    deadline = time.monotonic() + 5
    while stamp() == before:  # PostgreSQL: pushed by NOTIFY, within milliseconds
        assert time.monotonic() < deadline, "the stamp never changed"
        time.sleep(0.01)


def test_the_refresh_lock_is_exclusive_across_handles(make_store: StoreFactory) -> None:
    first, second = make_store(), make_store()
    held = first.refresh_lock("alice", 1)
    started = time.monotonic()
    with pytest.raises(StoreError):
        second.refresh_lock("alice", 0.3)
    assert time.monotonic() - started >= 0.25  # it waited, then gave up
    other = second.refresh_lock("bob", 0.3)  # another account: not blocked
    other.release()
    held.release()
    second.refresh_lock("alice", 0.3).release()


HOLDER = """
import sys, time
from gateway.config import parse_config
from gateway.oauth.store import open_store
raw = {"server": {"state_dir": sys.argv[1]}}
if sys.argv[2]:
    raw["store"] = {"url": sys.argv[2]}
store = open_store(parse_config(raw, base_dir=__import__("pathlib").Path(sys.argv[1])))
held = store.refresh_lock("alice", 5)
print("held", flush=True)
time.sleep(60)
"""


def test_the_refresh_lock_dies_with_its_holder(make_store: StoreFactory, tmp_path: Path,
                                               request: pytest.FixtureRequest) -> None:
    store = make_store()
    url = request.getfixturevalue("pg_url") if isinstance(store, PgStore) else ""
    if isinstance(store, PgStore):  # the holder must use the same database
        store.close()
        store = PgStore(url, max_connections=2, timeout=3)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "state"), url],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(StoreError):
            store.refresh_lock("alice", 0.2)
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
        store.refresh_lock("alice", 5).release()
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
        store.close()


def test_postgresql_restart_fails_temporarily_and_recovers(pg_url: str, postgres) -> None:  # type: ignore[no-untyped-def]
    store = PgStore(pg_url, max_connections=3, timeout=1)
    try:
        store.save_account(RECORD)
        postgres.stop()
        started = time.monotonic()
        with pytest.raises(StoreError) as caught:
            store.account("alice")
        assert time.monotonic() - started < 5  # bounded by store_timeout, no hang
        assert "mailgate@" not in str(caught.value) or "password" not in str(caught.value)
        postgres.start()
        deadline = time.monotonic() + 10
        while True:  # the pool drops the dead connections and makes new ones
            try:
                assert store.account("alice") is not None
                break
            except StoreError:
                assert time.monotonic() < deadline, "no recovery after the restart"
                time.sleep(0.1)
    finally:
        if not postgres.running:
            postgres.start()
        store.close()


async def test_async_callers_use_it_from_worker_threads(make_store: StoreFactory) -> None:
    store = make_store()
    await trio.to_thread.run_sync(store.save_account, RECORD)
    names = await trio.to_thread.run_sync(store.account_names)
    assert names == ["alice"]


def test_the_maildrop_lock_is_tried_not_waited_for(make_store: StoreFactory) -> None:
    first, second = make_store(), make_store()
    held = first.maildrop_lock("alice")
    assert held is not None
    started = time.monotonic()
    assert second.maildrop_lock("alice") is None  # [IN-USE] at once
    assert time.monotonic() - started < 1
    other = second.maildrop_lock("bob")
    assert other is not None
    other.release()
    held.release()
    held.release()  # twice is harmless
    again = second.maildrop_lock("alice")
    assert again is not None
    again.release()


def test_postgresql_remembers_addresses_as_digests(pg_url: str) -> None:
    """The remembered-address table of gateway.defence (the same methods as the SQLite
    store's on the main line): one random key per store, digests only, forgotten with age."""
    store = PgStore(pg_url, max_connections=2, timeout=3)
    try:
        key = store.address_key()
        assert len(key) == 32
        again = PgStore(pg_url, max_connections=2, timeout=3)
        assert again.address_key() == key  # kept across opens
        again.close()
        store.save_account(RECORD)
        store.remember_address("alice", b"\x01digest", 100.0, forget_before=0.0)
        store.remember_address("alice", b"\x02other", 200.0, forget_before=150.0)
        assert store.trusted_addresses() == [("alice", b"\x02other", 200.0)]
        store.delete_account("alice")
        assert store.trusted_addresses() == []
    finally:
        store.close()


@pytest.fixture(params=["files", "postgresql"])
def make_pop3_state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[
        Callable[[], Pop3StateStore]]:
    """POP3 state stores on one shared place: the files of ``state_dir/pop3/`` without
    ``[store] url``, the PostgreSQL store with it."""
    opened: list[PgStore] = []
    make: Callable[[], Pop3StateStore]
    if request.param == "files":
        def make() -> Pop3StateStore:
            return Pop3StateFiles(tmp_path / "pop3")
    else:
        make = _pg_stores(request, opened)
    yield make
    for store in opened:
        store.close()


def test_pop3_listing_and_sizes_round_trip_across_handles(
    make_pop3_state: Callable[[], Pop3StateStore],
) -> None:
    state = make_pop3_state()
    listings = Listings(state)
    assert listings.load("alice") is None and state.pop3_state("alice", "sizes") is None
    listing = Listing("INBOX", 7, 12, ((3, 100, None), (9, 2048, None), (11, 5, None)))
    listings.save("alice", listing)
    state.save_pop3_state("alice", "sizes", '{"7:9":2050}')
    # Another handle on the same place (another instance) sees both; other accounts nothing.
    other = make_pop3_state()
    assert Listings(other).load("alice") == listing
    assert other.pop3_state("alice", "sizes") == '{"7:9":2050}'
    assert Listings(other).load("bob") is None
    # A save replaces; a damaged listing is ignored (it is rebuilt), never an error.
    shorter = Listing("INBOX", 7, 13, ((9, 2048, None), (12, 1, 0x1F)))
    Listings(other).save("alice", shorter)
    assert listings.load("alice") == shorter
    state.save_pop3_state("alice", "listing", "{not json")
    assert Listings(other).load("alice") is None
