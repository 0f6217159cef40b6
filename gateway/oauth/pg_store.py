"""The PostgreSQL credential store: the same records as the SQLite file, shared by instances.

Theory of operation
-------------------
:class:`PgStore` is the second implementation of :class:`gateway.ports.CredentialStore`,
chosen by ``[store] url = "postgresql://..."`` (:func:`gateway.oauth.store.open_store`). Several
mailgate instances on several machines use one database. Rules:

1. **Same data, still sealed.** Three tables with the SQLite store's columns (``accounts``,
   ``secrets``, ``status``). Secrets are sealed by :mod:`gateway.oauth.sealing` before they get
   here: PostgreSQL never sees a token, a password or a data key in clear -- a dump of the
   database is as safe as a copy of the SQLite file.
2. **Blocking, pooled.** psycopg 3 with a :class:`psycopg_pool.ConnectionPool` of at most
   ``limits.store_connections`` connections, each checked before it is handed out (a server
   restart leaves dead connections in the pool; a reconnection that keeps failing is given up
   after ``limits.store_timeout`` and the next caller starts a fresh one). Methods block; async callers run them with
   ``trio.to_thread.run_sync``, as for SQLite. Every write is one transaction. A connection
   that cannot be had within ``limits.store_timeout`` seconds, and every database error,
   raises :class:`~gateway.oauth.store.StoreError`: the callers turn it into a temporary
   failure, never into "needs re-authorization".
3. **Single-flight refresh across instances** (:meth:`PgStore.refresh_lock`): a session-level
   advisory lock per account, held on a connection of its own while the holder reads the
   stored tokens, refreshes and saves the rotated refresh token. Other instances wait for it and
   then read what it saved. If the holder's machine dies, its connection dies and PostgreSQL
   releases the lock.
4. **Changes pushed** (:meth:`PgStore.change_stamp`): every write transaction sends
   ``NOTIFY mailgate_store`` (delivered at commit); a listener thread counts the notifications
   on a connection of its own. The stamp is (connection generation, count): callers cache what
   they read until it changes, exactly as with SQLite's change counter. While the listener is
   not connected the stamp raises ``OSError`` and callers read the database directly; after a
   reconnection the generation differs, so nothing missed meanwhile stays cached.
5. **The POP3 maildrop lock** (:meth:`PgStore.maildrop_lock`, RFC 1939's exclusive access) is
   the same kind of session-level advisory lock, tried without waiting: a POP3 session on one
   instance makes every other instance answer ``[IN-USE]``, and it is released with the
   session -- or with its connection when the instance dies. A session holds one pooled
   connection for its duration (size ``limits.store_connections`` for the POP3 sessions
   expected at once).
6. **POP3 state** (:meth:`PgStore.pop3_state`, :class:`gateway.ports.Pop3StateStore`): the
   remembered POP3 listing and exact sizes of each account, JSON text in the ``pop3_state``
   table (no secrets), so a session on any instance starts from what the last one left. The
   maildrop lock makes one writer per account; a write sends no ``NOTIFY`` (nothing caches
   it), and a database error is raised as ``OSError``, as the files would.

The schema is created on first use, under a transaction-level advisory lock, so that instances
starting together do not race.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from .store import AccountRecord, AccountStatus, SealedSecret, StoreError

log = logging.getLogger("mailgate.store")

__all__ = ["PgStore", "redact_url"]

CHANNEL = "mailgate_store"
#: First key of the two-key advisory locks, one number per use (the second is the account's).
LOCK_SCHEMA, LOCK_REFRESH, LOCK_MAILDROP = 0x6D61696C, 1, 2
LISTEN_POLL = 1.0  # seconds the listener thread waits for notifications between stop checks
LISTEN_RETRY = 1.0  # seconds before the listener reconnects after losing its connection

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS accounts (
        name          TEXT PRIMARY KEY,
        provider      TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        key_wrapping  TEXT NOT NULL CHECK (key_wrapping IN ('password', 'keyfile')),
        kdf           TEXT,
        wrapped_key   BYTEA NOT NULL,
        created       DOUBLE PRECISION NOT NULL,
        updated       DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS secrets (
        account  TEXT NOT NULL REFERENCES accounts(name) ON DELETE CASCADE,
        kind     TEXT NOT NULL,
        provider TEXT NOT NULL,
        sealed   BYTEA NOT NULL,
        updated  DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (account, kind))""",
    """CREATE TABLE IF NOT EXISTS status (
        account TEXT PRIMARY KEY,
        state   TEXT NOT NULL,
        detail  TEXT NOT NULL,
        updated DOUBLE PRECISION NOT NULL)""",
    # Remembered client addresses (gateway.defence): HMACs under the store's own key, never
    # an address in clear.
    """CREATE TABLE IF NOT EXISTS meta (
        name  TEXT PRIMARY KEY,
        value BYTEA NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS trusted_addresses (
        account   TEXT NOT NULL,
        digest    BYTEA NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (account, digest))""",
    # Remembered POP3 state (gateway.frontends.pop3_listing, pop3_mapping): JSON text per
    # account and kind ("listing", "sizes"), shared by every instance serving the account.
    """CREATE TABLE IF NOT EXISTS pop3_state (
        account TEXT NOT NULL,
        kind    TEXT NOT NULL,
        value   TEXT NOT NULL,
        updated DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (account, kind))""",
]
ADDRESS_KEY = "address_key"  # the `meta` row holding the key of the address digests


#: Deleting an account: its secrets and status first, then the record.
_DELETE_ACCOUNT = ("DELETE FROM secrets WHERE account = %s", "DELETE FROM status WHERE account = %s",
                   "DELETE FROM trusted_addresses WHERE account = %s",
                   "DELETE FROM pop3_state WHERE account = %s",
                   "DELETE FROM accounts WHERE name = %s")


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the configured PostgreSQL URL"
    return f"postgresql://{info.get('host', '')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def _lock_key(account: str) -> int:
    """The second advisory-lock key of an account (collisions only serialise two accounts)."""
    return zlib.crc32(account.encode("utf-8")) - 2**31


class HeldLock:
    """A session-level advisory lock on a pool connection; :meth:`release` gives both back."""

    def __init__(self, pool: ConnectionPool[Any], conn: psycopg.Connection[Any], use: int,
                 key: int):
        self._pool, self._conn, self._use, self._key = pool, conn, use, key
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            self._conn.execute("SELECT pg_advisory_unlock(%s, %s)", (self._use, self._key))
        except psycopg.Error:
            pass  # a dead connection holds no lock
        finally:
            self._pool.putconn(self._conn)


class PgStore:
    def __init__(self, url: str, *, max_connections: int = 10, timeout: float = 10.0):
        self._where = redact_url(url)
        self._url = url
        self._timeout = timeout
        self._pool: ConnectionPool[Any] = ConnectionPool(
            url, min_size=1, max_size=max_connections, kwargs={"autocommit": True},
            check=ConnectionPool.check_connection, timeout=timeout, open=False,
            name="mailgate-store",
            # Give up a failing reconnection soon: the next caller starts a fresh attempt, so
            # recovery after an outage does not wait out a long exponential back-off.
            reconnect_timeout=timeout,
        )
        self._generation = 0
        self._count = 0
        self._listening = False
        self._stop = threading.Event()
        try:
            self._pool.open(wait=True, timeout=timeout)
            self._create_schema()
        except (psycopg.Error, PoolTimeout) as exc:
            self._pool.close()
            raise StoreError(f"PostgreSQL store {self._where}: {exc}") from None
        self._listener = threading.Thread(target=self._listen, name="mailgate-store-listen",
                                          daemon=True)
        self._listener.start()

    def close(self) -> None:
        self._stop.set()
        self._pool.close()
        self._listener.join(LISTEN_POLL * 3)

    # --- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection(timeout=self._timeout) as conn:
                yield conn
        except (psycopg.Error, PoolTimeout) as exc:
            raise StoreError(f"PostgreSQL store {self._where}: {exc}") from None

    @contextmanager
    def _write(self, account: str) -> Iterator[psycopg.Connection[Any]]:
        with self._conn() as conn, conn.transaction():
            yield conn
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, account))

    def _create_schema(self) -> None:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_SCHEMA,))
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT INTO meta (name, value) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                         (ADDRESS_KEY, secrets.token_bytes(32)))

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True,
                                     connect_timeout=max(1, int(self._timeout))) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._generation += 1
                    self._listening = True
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=LISTEN_POLL):
                            self._count += 1
            except psycopg.Error as exc:
                if self._listening:
                    log.warning("PostgreSQL store %s: change listener lost: %s", self._where, exc)
            self._listening = False
            self._stop.wait(LISTEN_RETRY)

    # --- reads ------------------------------------------------------------------------------

    def change_stamp(self) -> tuple[int, int]:
        """(listener generation, notifications seen); ``OSError`` while not listening."""
        if not self._listening:
            raise OSError("the PostgreSQL change listener is not connected")
        return (self._generation, self._count)

    def account(self, name: str) -> AccountRecord | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT name, provider, password_hash, key_wrapping, kdf, wrapped_key, created,"
                " updated FROM accounts WHERE name = %s", (name,)).fetchone()
        if row is None:
            return None
        return AccountRecord(row[0], row[1], row[2], row[3], row[4], bytes(row[5]), row[6], row[7])

    def account_names(self) -> list[str]:
        with self._conn() as conn:
            return [r[0] for r in conn.execute("SELECT name FROM accounts ORDER BY name")]

    def secret(self, account: str, kind: str = "refresh_token") -> SealedSecret | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT provider, sealed, updated FROM secrets WHERE account = %s AND kind = %s",
                (account, kind)).fetchone()
        return SealedSecret(row[0], bytes(row[1]), row[2]) if row else None

    def status(self, account: str) -> AccountStatus | None:
        with self._conn() as conn:
            row = conn.execute("SELECT state, detail, updated FROM status WHERE account = %s",
                               (account,)).fetchone()
        return AccountStatus(*row) if row else None

    def address_key(self) -> bytes:
        """The store's own random key for the digests of remembered addresses."""
        with self._conn() as conn:
            row = conn.execute("SELECT value FROM meta WHERE name = %s", (ADDRESS_KEY,)).fetchone()
        if row is None:
            raise StoreError(f"PostgreSQL store {self._where}: no address key")
        return bytes(row[0])

    def trusted_addresses(self) -> list[tuple[str, bytes, float]]:
        """Every remembered address: (account, digest, last seen as a Unix time)."""
        with self._conn() as conn:
            rows = conn.execute("SELECT account, digest, last_seen FROM trusted_addresses")
            return [(r[0], bytes(r[1]), r[2]) for r in rows]

    # --- writes -----------------------------------------------------------------------------

    def adopt_address_key(self, key: bytes) -> None:
        with self._conn() as conn, conn.transaction():
            conn.execute("INSERT INTO meta (name, value) VALUES (%s, %s)"
                         " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                         (ADDRESS_KEY, key))

    def remember_address(self, account: str, digest: bytes, last_seen: float,
                         *, forget_before: float) -> None:
        """Record that ``digest`` (an address HMAC) logged in as ``account``; the same
        transaction forgets the account's addresses not seen since ``forget_before``."""
        with self._write(account) as conn:
            conn.execute(
                "INSERT INTO trusted_addresses (account, digest, last_seen) VALUES (%s, %s, %s)"
                " ON CONFLICT (account, digest) DO UPDATE SET last_seen = excluded.last_seen",
                (account, digest, last_seen))
            conn.execute("DELETE FROM trusted_addresses WHERE account = %s AND last_seen < %s",
                         (account, forget_before))

    def save_account(
        self, record: AccountRecord, secrets: dict[str, SealedSecret] | None = None
    ) -> None:
        now = time.time()
        with self._write(record.name) as conn:
            conn.execute(
                "INSERT INTO accounts (name, provider, password_hash, key_wrapping, kdf,"
                " wrapped_key, created, updated) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET provider = excluded.provider,"
                " password_hash = excluded.password_hash, key_wrapping = excluded.key_wrapping,"
                " kdf = excluded.kdf, wrapped_key = excluded.wrapped_key,"
                " updated = excluded.updated",
                (record.name, record.provider, record.password_hash, record.key_wrapping,
                 record.kdf, record.wrapped_key, record.created or now, now))
            if secrets is not None:  # a new data key: the old secrets go, all at once
                conn.execute("DELETE FROM secrets WHERE account = %s", (record.name,))
                rows = [(record.name, kind, s.provider, s.sealed, now) for kind, s in secrets.items()]
                with conn.cursor() as cursor:
                    cursor.executemany("INSERT INTO secrets (account, kind, provider, sealed,"
                                       " updated) VALUES (%s, %s, %s, %s, %s)", rows)

    def save_secret(self, account: str, kind: str, provider: str, sealed: bytes) -> None:
        with self._write(account) as conn:
            conn.execute(
                "INSERT INTO secrets (account, kind, provider, sealed, updated)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (account, kind) DO UPDATE SET"
                " provider = excluded.provider, sealed = excluded.sealed,"
                " updated = excluded.updated",
                (account, kind, provider, sealed, time.time()))

    def set_status(self, account: str, state: str, detail: str = "") -> None:
        with self._write(account) as conn:
            conn.execute(
                "INSERT INTO status (account, state, detail, updated) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (account) DO UPDATE SET state = excluded.state,"
                " detail = excluded.detail, updated = excluded.updated",
                (account, state, detail, time.time()))

    def delete_account(self, name: str) -> None:
        with self._write(name) as conn:
            for statement in _DELETE_ACCOUNT:
                conn.execute(statement, (name,))

    # --- POP3 state (gateway.ports.Pop3StateStore) -----------------------------------------

    def pop3_state(self, account: str, kind: str) -> str | None:
        try:
            with self._conn() as conn:
                row = conn.execute("SELECT value FROM pop3_state WHERE account = %s AND kind = %s",
                                   (account, kind)).fetchone()
        except StoreError as exc:
            raise OSError(str(exc)) from None
        return None if row is None else str(row[0])

    def save_pop3_state(self, account: str, kind: str, text: str) -> None:
        # No notification: nothing cached elsewhere depends on it (every session reads it).
        try:
            with self._conn() as conn:
                conn.execute(
                    "INSERT INTO pop3_state (account, kind, value, updated) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (account, kind) DO UPDATE SET value = excluded.value,"
                    " updated = excluded.updated",
                    (account, kind, text, time.time()))
        except StoreError as exc:
            raise OSError(str(exc)) from None

    # --- cross-instance locks ---------------------------------------------------------------

    def _getconn(self) -> psycopg.Connection[Any]:
        """A pool connection the caller holds (a lock lives as long as its session)."""
        try:
            conn: psycopg.Connection[Any] = self._pool.getconn(timeout=self._timeout)
        except PoolTimeout as exc:
            raise StoreError(f"PostgreSQL store {self._where}: {exc}") from None
        return conn

    def refresh_lock(self, account: str, timeout: float) -> HeldLock:
        """Wait up to ``timeout`` seconds for the account's refresh lock (rule 3)."""
        key, conn = _lock_key(account), self._getconn()
        try:
            conn.execute("SELECT set_config('lock_timeout', %s, false)",
                         (f"{max(1, int(timeout * 1000))}ms",))
            conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_REFRESH, key))
            conn.execute("RESET lock_timeout")
        except psycopg.Error as exc:
            try:
                conn.execute("RESET lock_timeout")
            except psycopg.Error:
                pass
            self._pool.putconn(conn)
            raise StoreError(f"PostgreSQL store {self._where}: refresh lock of {account}: "
                             f"{exc}") from None
        return HeldLock(self._pool, conn, LOCK_REFRESH, key)

    def maildrop_lock(self, account: str) -> HeldLock | None:
        """The account's POP3 maildrop lock across instances (rule 5), or None when another
        session holds it."""
        key, conn = _lock_key(account), self._getconn()
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)",
                               (LOCK_MAILDROP, key)).fetchone()
        except psycopg.Error as exc:
            self._pool.putconn(conn)
            raise StoreError(f"PostgreSQL store {self._where}: maildrop lock of {account}: "
                             f"{exc}") from None
        if row is None or not row[0]:
            self._pool.putconn(conn)
            return None
        return HeldLock(self._pool, conn, LOCK_MAILDROP, key)
