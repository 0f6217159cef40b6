"""The state store: one SQLite file (stdlib ``sqlite3``) in ``server.state_dir``.

Theory of operation
-------------------
The store holds, per account: the local password verifier (an argon2 PHC string), the account's
data key *wrapped* (see :mod:`gateway.oauth.sealing`), the sealed upstream secrets, and a small
status row that ``mailgate check`` reads ("needs re-authorization", with the fixing command),
and the addresses remembered for the account (:class:`gateway.defence.TrustedAddresses`): an
HMAC of each address under the store's own random key (table ``meta``) and when it last logged
in -- never the address in clear. No secret is ever stored in clear.

* Schema: ``PRAGMA user_version``. Opening a store of an older version runs the idempotent
  schema script again, which adds what is missing (1 → 2: ``meta`` and ``trusted_addresses``).

* Atomic: every write is one SQLite transaction (rollback journal, ``synchronous=FULL``):
  after a crash the file holds either the old or the new state, never a mix. A rotated refresh
  token is committed before the caller uses the access token that came with it.
* Private: the directory is created 0700 and the database 0600 before SQLite first opens it
  (SQLite gives its journal the database's mode).
* Read-only by default: lookups open the file read-only (``mode=ro``), so a failed login can
  never change a byte of it.
* Blocking: methods do file I/O; async callers run them with ``trio.to_thread.run_sync``. Each
  call opens its own connection, so calls from several threads need no locking here; SQLite's
  own locking serialises writers (``BUSY_TIMEOUT`` bounds the wait).
* Change stamp: :meth:`StateStore.change_stamp` says cheaply whether the file may have changed
  since a previous call (any writer, this process or another: ``mailgate authorize``, the admin
  plane). It is the file's identity and size plus SQLite's own *file change counter* (header
  offset 24, incremented by every committed write transaction in rollback-journal mode, which
  this store uses), read with one 4-byte ``pread``: cheap enough for the event loop, so callers
  can cache what they read and re-read only after a change (see
  :class:`gateway.oauth.accounts.AccountManager`).

:class:`StateStore` is the first implementation of :class:`gateway.ports.CredentialStore`
(:class:`gateway.oauth.pg_store.PgStore`, for several instances, the second).

Refresh lock: :meth:`StateStore.refresh_lock` is an ``flock`` on
``state_dir/refresh/<account>.lock``, so the processes sharing a state directory (``[server]
workers``, ``mailgate authorize`` beside a running gateway) refresh an account's token one at a
time; the kernel releases it when its holder dies.
:func:`open_store` is the one place a store is made from the configuration: the gateway
(:func:`gateway.app.build_context`), the commands and ``mailgate check`` all call it.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ..config import Config
    from ..ports import CredentialStore

STATE_DB_NAME = "mailgate.sqlite3"
REFRESH_LOCK_DIR = "refresh"  # under state_dir: one lock file per account
MAILDROP_LOCK_DIR = "pop3"  # under state_dir: the POP3 maildrop locks
LOCK_POLL = 0.02  # seconds between attempts while another process holds a refresh lock
#: Where SQLite keeps its 4-byte big-endian file change counter in the database header.
CHANGE_COUNTER_OFFSET = 24
BUSY_TIMEOUT = 10.0  # seconds a writer waits for another writer
SCHEMA_VERSION = 2  # 2: remembered addresses (`trusted_addresses`, `meta`)
#: The `meta` row holding the store's own random key for address digests.
ADDRESS_KEY = "address_key"

REFRESH_TOKEN = "refresh_token"

KeyWrapping = Literal["password", "keyfile"]

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS accounts (
    name          TEXT PRIMARY KEY,
    provider      TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    key_wrapping  TEXT NOT NULL CHECK (key_wrapping IN ('password', 'keyfile')),
    kdf           TEXT,
    wrapped_key   BLOB NOT NULL,
    created       REAL NOT NULL,
    updated       REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (
    account  TEXT NOT NULL REFERENCES accounts(name) ON DELETE CASCADE,
    kind     TEXT NOT NULL,
    provider TEXT NOT NULL,
    sealed   BLOB NOT NULL,
    updated  REAL NOT NULL,
    PRIMARY KEY (account, kind)
);
CREATE TABLE IF NOT EXISTS status (
    account TEXT PRIMARY KEY,
    state   TEXT NOT NULL,
    detail  TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS trusted_addresses (
    account   TEXT NOT NULL,
    digest    BLOB NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (account, digest)
);
PRAGMA user_version = {SCHEMA_VERSION};
"""


@dataclass(frozen=True)
class AccountRecord:
    name: str
    provider: str
    password_hash: str
    key_wrapping: KeyWrapping
    kdf: str | None  # KdfParams JSON when key_wrapping == "password"
    wrapped_key: bytes
    created: float = 0.0
    updated: float = 0.0


@dataclass(frozen=True)
class SealedSecret:
    provider: str
    sealed: bytes
    updated: float


@dataclass(frozen=True)
class AccountStatus:
    state: str  # "ok" | "needs_reauthorization"
    detail: str
    updated: float


class StoreError(Exception):
    """The state file cannot be opened, read or written."""


class FileLock:
    """An exclusive ``flock`` on an open file: held until :meth:`release` or the holder's
    death (the kernel drops it with the process, ``kill -9`` included)."""

    def __init__(self, fd: int):
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock


class StateStore:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / STATE_DB_NAME
        self._initialise()

    # --- opening ----------------------------------------------------------------------------

    def _initialise(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            with self._read() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                # Every statement is idempotent (IF NOT EXISTS / OR IGNORE): the same script
                # creates a new store and brings an older one up to date.
                with self._write() as db:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)",
                               (ADDRESS_KEY, secrets.token_bytes(32)))
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"state file {self.path}: {exc}") from None

    def _connect(self, *, readonly: bool) -> sqlite3.Connection:
        if readonly:
            uri = self.path.absolute().as_uri() + "?mode=ro"
            db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None)
        else:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
        return db

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        try:
            with closing(self._connect(readonly=True)) as db:
                yield db
        except sqlite3.Error as exc:
            raise StoreError(f"state file {self.path}: {exc}") from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            with closing(self._connect(readonly=False)) as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"state file {self.path}: {exc}") from None

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own connection."""

    def refresh_lock(self, account: str, timeout: float) -> FileLock:
        """The account's token-refresh lock, shared by every process using this state
        directory (``state_dir/refresh/<account>.lock``); waits up to ``timeout`` seconds,
        then raises StoreError."""
        held = self._flock(REFRESH_LOCK_DIR, account, timeout)
        if held is None:
            raise StoreError(f"refresh lock of {account}: still held after {timeout:.0f} s")
        return held

    def maildrop_lock(self, account: str) -> FileLock | None:
        """The account's POP3 maildrop lock (``state_dir/pop3/<account>.lock``, the file the
        POP3 front end always used), or None when another session holds it."""
        return self._flock(MAILDROP_LOCK_DIR, account, 0.0)

    def _flock(self, subdir: str, account: str, timeout: float) -> FileLock | None:
        directory = self.path.parent / subdir
        path = directory / (urllib.parse.quote(account, safe="") + ".lock")
        deadline = time.monotonic() + timeout
        try:
            directory.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"lock {path}: {exc.strerror}") from None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return FileLock(fd)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(LOCK_POLL)

    # --- reads ------------------------------------------------------------------------------

    def change_stamp(self) -> tuple[int, int, int, int, bytes]:
        """A value that changes whenever the database file is written (see the module
        docstring). Raises ``OSError`` if the file cannot be read; callers then read the
        store directly."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            counter = os.pread(fd, 4, CHANGE_COUNTER_OFFSET)
        finally:
            os.close(fd)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, counter)

    def account(self, name: str) -> AccountRecord | None:
        with self._read() as db:
            row = db.execute(
                "SELECT name, provider, password_hash, key_wrapping, kdf, wrapped_key, created,"
                " updated FROM accounts WHERE name = ?",
                (name,),
            ).fetchone()
        return AccountRecord(*row) if row else None

    def account_names(self) -> list[str]:
        with self._read() as db:
            return [r[0] for r in db.execute("SELECT name FROM accounts ORDER BY name")]

    def secret(self, account: str, kind: str = REFRESH_TOKEN) -> SealedSecret | None:
        with self._read() as db:
            row = db.execute(
                "SELECT provider, sealed, updated FROM secrets WHERE account = ? AND kind = ?",
                (account, kind),
            ).fetchone()
        return SealedSecret(*row) if row else None

    def status(self, account: str) -> AccountStatus | None:
        with self._read() as db:
            row = db.execute(
                "SELECT state, detail, updated FROM status WHERE account = ?", (account,)
            ).fetchone()
        return AccountStatus(*row) if row else None

    def address_key(self) -> bytes:
        """The store's own random key for the digests of remembered addresses."""
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE name = ?", (ADDRESS_KEY,)).fetchone()
        if row is None:
            raise StoreError(f"state file {self.path}: no address key (schema {SCHEMA_VERSION}?)")
        return bytes(row[0])

    def trusted_addresses(self) -> list[tuple[str, bytes, float]]:
        """Every remembered address: (account, digest, last seen as a Unix time)."""
        with self._read() as db:
            return [(r[0], bytes(r[1]), r[2]) for r in db.execute(
                "SELECT account, digest, last_seen FROM trusted_addresses")]

    # --- writes (each one transaction) ------------------------------------------------------

    def adopt_address_key(self, key: bytes) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (ADDRESS_KEY, key))

    def remember_address(self, account: str, digest: bytes, last_seen: float,
                         *, forget_before: float) -> None:
        """Record that ``digest`` (an address HMAC) logged in as ``account`` at ``last_seen``;
        the same transaction forgets the account's addresses not seen since ``forget_before``."""
        with self._write() as db:
            db.execute(
                "INSERT INTO trusted_addresses (account, digest, last_seen) VALUES (?, ?, ?)"
                " ON CONFLICT(account, digest) DO UPDATE SET last_seen = excluded.last_seen",
                (account, digest, last_seen),
            )
            db.execute("DELETE FROM trusted_addresses WHERE account = ? AND last_seen < ?",
                       (account, forget_before))

    def save_account(
        self, record: AccountRecord, secrets: dict[str, SealedSecret] | None = None
    ) -> None:
        """Create or replace an account. With ``secrets``, they replace every stored secret of
        the account in the same transaction (a new data key invalidates the old ones)."""
        now = time.time()
        with self._write() as db:
            db.execute(
                "INSERT INTO accounts (name, provider, password_hash, key_wrapping, kdf,"
                " wrapped_key, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET provider = excluded.provider,"
                " password_hash = excluded.password_hash, key_wrapping = excluded.key_wrapping,"
                " kdf = excluded.kdf, wrapped_key = excluded.wrapped_key,"
                " updated = excluded.updated",
                (
                    record.name,
                    record.provider,
                    record.password_hash,
                    record.key_wrapping,
                    record.kdf,
                    record.wrapped_key,
                    record.created or now,
                    now,
                ),
            )
            if secrets is not None:
                db.execute("DELETE FROM secrets WHERE account = ?", (record.name,))
                for kind, secret in secrets.items():
                    db.execute(
                        "INSERT INTO secrets (account, kind, provider, sealed, updated)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (record.name, kind, secret.provider, secret.sealed, now),
                    )

    def save_secret(self, account: str, kind: str, provider: str, sealed: bytes) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO secrets (account, kind, provider, sealed, updated)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(account, kind) DO UPDATE SET"
                " provider = excluded.provider, sealed = excluded.sealed,"
                " updated = excluded.updated",
                (account, kind, provider, sealed, time.time()),
            )

    def set_status(self, account: str, state: str, detail: str = "") -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO status (account, state, detail, updated) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(account) DO UPDATE SET state = excluded.state,"
                " detail = excluded.detail, updated = excluded.updated",
                (account, state, detail, time.time()),
            )

    def delete_account(self, name: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM secrets WHERE account = ?", (name,))
            db.execute("DELETE FROM status WHERE account = ?", (name,))
            db.execute("DELETE FROM trusted_addresses WHERE account = ?", (name,))
            db.execute("DELETE FROM accounts WHERE name = ?", (name,))


def open_store(config: Config) -> CredentialStore:
    """The credential store the configuration names: PostgreSQL with ``[store] url``, else the
    SQLite file in ``server.state_dir``. Raises :class:`StoreError` when it cannot be opened.
    Callers that run long ``close()`` it when done."""
    if config.store.url is not None:
        from .pg_store import PgStore  # here: pg_store builds on this module's records

        return PgStore(config.store.url.get_secret_value(),
                       max_connections=config.limits.store_connections,
                       timeout=config.limits.store_timeout)
    return StateStore(config.server.state_dir)
