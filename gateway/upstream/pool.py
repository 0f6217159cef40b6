"""The pool of logged-in upstream connections: a client login that finds one costs no upstream login.

Theory of operation
-------------------
Rules first:

1. **Only a clean connection comes back.** A session gives its connection back
   (:meth:`UpstreamPool.put`) only when nothing of it can reach the next session: no command
   outstanding, no response half read, no ``* BYE`` seen, and nothing enabled for the rest of
   the connection that the next session does not accept (``lasting``: e.g. ``CONDSTORE``, which
   the POP3 snapshot enables and an IMAP client must never inherit). A selected mailbox is left
   with ``UNSELECT`` (RFC 3691), never ``CLOSE`` (which expunges); a server without UNSELECT
   keeps nothing in the pool. Whatever is doubtful is logged out, never reused (the callers
   decide ``clean``: the IMAP relay from its :class:`~gateway.protocol.imap_relay_state.
   RelayState`, the POP3 session from how it ended). The UNSELECT is sent without waiting for
   its answer (:meth:`~gateway.upstream.engine.IMAPConnection.send_ahead`): giving a
   connection back costs no round trip, and :meth:`UpstreamPool.take` reads the answer (long
   arrived by then) first.
2. **A pooled connection is only reused with the credential it logged in with.** Each one
   remembers a digest of its access token (:func:`~gateway.upstream.login.token_fingerprint`);
   :meth:`UpstreamPool.take` is given the account's *current* token's digest and discards
   every connection logged in with another. The token cache refreshes a token before it
   expires and after the grant was renewed, so a connection never outlives the token it used
   (Microsoft 365 ends sessions with ``BYE AccessTokenExpired`` when it expires).
3. **A dead connection is discarded invisibly.** Before reuse, a connection on which anything
   arrived while idle (a provider's ``* BYE``, a closed socket) is discarded; one idle longer
   than :data:`CHECK_AFTER` seconds must answer ``NOOP`` first (within
   ``limits.logout_timeout``). The caller then logs in afresh: the client never sees it.
4. **Live sessions first.** Pooled connections hold their account's slots
   (``limits.upstream_connections_per_account``). A connection is not pooled while a session
   waits for a slot of its account, and :meth:`UpstreamPool.make_room` closes a pooled one
   when a new login finds the cap full. At most ``limits.upstream_pool_size`` idle
   connections are kept per account (0 turns the pool off); the oldest goes first.
5. **Closing.** :meth:`UpstreamPool.maintain` (a task of the server) closes connections idle
   for ``limits.upstream_pool_idle`` seconds and those on which something arrived (checked
   every :data:`SWEEP_INTERVAL` seconds); :meth:`UpstreamPool.retire_account` closes an
   account's on a configuration change; when ``maintain`` ends (shutdown) every pooled
   connection is logged out, in parallel, within ``limits.logout_timeout``. Retired
   connections are logged out in the background when ``maintain`` runs, so a login that
   discards one does not wait for its LOGOUT.

Connections are taken most-recently-used first (the one least likely to have been dropped).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from ..config import Limits
from .client import UpstreamIMAP

log = logging.getLogger("mailgate.upstream")

__all__ = ["CHECK_AFTER", "SWEEP_INTERVAL", "UpstreamPool"]

#: A pooled connection idle for longer than this (seconds) must answer NOOP before reuse.
CHECK_AFTER = 5.0
#: How often (seconds) idle connections are checked for expiry and for data from the server.
SWEEP_INTERVAL = 1.0


@dataclass(slots=True)
class _Idle:
    conn: UpstreamIMAP
    since: float  # trio time it was pooled


@dataclass(slots=True)
class _AccountPool:
    idle: list[_Idle] = field(default_factory=list)  # oldest first
    reused: int = 0


class UpstreamPool:
    """Idle logged-in upstream connections of every account (see the module docstring)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._pools: dict[str, _AccountPool] = {}
        self._nursery: trio.Nursery | None = None
        self._closed = False

    # ------------------------------------------------------------------ questions

    @property
    def enabled(self) -> bool:
        return self.limits.upstream_pool_size > 0 and not self._closed

    def idle_count(self, account: str) -> int:
        pool = self._pools.get(account)
        return len(pool.idle) if pool else 0

    def reused(self, account: str) -> int:
        pool = self._pools.get(account)
        return pool.reused if pool else 0

    # ------------------------------------------------------------------ taking

    async def take(
        self, account: str, credential: bytes, *, accept: frozenset[str] = frozenset()
    ) -> UpstreamIMAP | None:
        """A pooled connection of ``account`` logged in with ``credential`` whose lasting
        extensions are all in ``accept``, checked alive (rule 3); ``None`` if there is none."""
        pool = self._pools.get(account)
        if pool is None or not self.enabled:
            return None
        kept: list[_Idle] = []
        found: UpstreamIMAP | None = None
        while pool.idle and found is None:
            entry = pool.idle.pop()
            conn = entry.conn
            if not conn.lasting <= accept:
                kept.append(entry)
                continue
            if conn.credential != credential:
                self._retire(conn, "logged in with an older access token")
            elif not await self._settled(conn):
                self._retire(conn, "its UNSELECT failed", polite=False)
            elif conn.data_waiting() or not conn.usable:
                self._retire(conn, "the server sent something while it was idle", polite=False)
            elif trio.current_time() - entry.since > CHECK_AFTER and not await self._alive(conn):
                self._retire(conn, "it did not answer NOOP", polite=False)
            else:
                found = conn
        if self._pools.get(account) is not pool:  # retired meanwhile (a config change)
            for conn in [entry.conn for entry in kept] + ([found] if found else []):
                self._retire(conn, "the account's configuration changed")
            return None
        pool.idle.extend(reversed(kept))
        if found is None:
            return None
        pool.reused += 1
        log.debug("account %s: reusing a pooled upstream connection to %s", account, found.where)
        return found

    async def _settled(self, conn: UpstreamIMAP) -> bool:
        """Read the answer to the UNSELECT sent ahead, if any: it must be OK."""
        with trio.move_on_after(self.limits.logout_timeout):
            try:
                return all(answer.ok for answer in await conn.settle())
            except Exception:  # noqa: BLE001 - any failure means: not reusable
                return False
        return False

    async def _alive(self, conn: UpstreamIMAP) -> bool:
        with trio.move_on_after(self.limits.logout_timeout):
            try:
                response = await conn.command(b"NOOP")
            except Exception:  # noqa: BLE001 - any failure means: not alive
                return False
            return response.ok and conn.usable and not conn.data_waiting()
        conn.interrupted("NOOP")
        return False

    def make_room(self, account: str, in_use: int, capacity: int) -> None:
        """A login of ``account`` found no pooled connection to reuse: if its cap is full,
        close the oldest pooled one so the login gets its slot (rule 4)."""
        pool = self._pools.get(account)
        if pool and pool.idle and in_use >= capacity:
            self._retire(pool.idle.pop(0).conn, "a new session needs its slot")

    # ------------------------------------------------------------------ giving back

    async def put(self, account: str, conn: UpstreamIMAP, *, clean: bool, waiting: int) -> None:
        """A session is done with ``conn``: pool it if rule 1 and 4 allow, else log it out
        (bounded by ``limits.logout_timeout``; never raises)."""
        with trio.CancelScope(shield=True):
            reason = self._refusal(conn, clean=clean, waiting=waiting)
            if reason is None and conn.selected is not None:
                reason = await self._unselect(conn)
            if reason is not None:
                log.debug("account %s: upstream connection not pooled: %s", account, reason)
                await conn.logout(self.limits.logout_timeout)
                return
            pool = self._pools.setdefault(account, _AccountPool())
            pool.idle.append(_Idle(conn, trio.current_time()))
            while len(pool.idle) > self.limits.upstream_pool_size:
                self._retire(pool.idle.pop(0).conn, "the pool of this account is full")

    def _refusal(self, conn: UpstreamIMAP, *, clean: bool, waiting: int) -> str | None:
        if not self.enabled:
            return "the pool is off (limits.upstream_pool_size = 0)" if not self._closed else "shutting down"
        if not clean:
            return "the session did not leave it clean"
        if not conn.usable or conn.data_waiting():
            return "the connection is not at rest"
        if waiting:
            return "another session waits for a slot"
        if conn.selected is not None and "UNSELECT" not in conn.capabilities:
            return "the server has no UNSELECT"
        return None

    async def _unselect(self, conn: UpstreamIMAP) -> str | None:
        """Send UNSELECT ahead (its answer is read by :meth:`take`)."""
        with trio.move_on_after(self.limits.logout_timeout):
            try:
                await conn.send_ahead(b"UNSELECT")
            except Exception as exc:  # noqa: BLE001 - the connection is then not reused
                return f"UNSELECT failed: {exc}"
            conn.selected = None
            return None
        conn.interrupted("UNSELECT")
        return "UNSELECT took too long"

    # ------------------------------------------------------------------ closing

    def retire_account(self, account: str, why: str) -> None:
        """Close every pooled connection of ``account`` (its configuration changed)."""
        pool = self._pools.pop(account, None)
        for entry in pool.idle if pool else ():
            self._retire(entry.conn, why)

    def retire_all(self, why: str) -> None:
        for account in list(self._pools):
            self.retire_account(account, why)

    def _retire(self, conn: UpstreamIMAP, why: str, *, polite: bool = True) -> None:
        log.debug("pooled upstream connection to %s closed: %s", conn.where, why)
        if self._nursery is not None:
            self._nursery.start_soon(self._goodbye, conn, polite)
            return
        # No maintenance task (a bare connector): close at once, without a goodbye.
        conn.abandon()

    async def _goodbye(self, conn: UpstreamIMAP, polite: bool) -> None:
        try:
            if polite:
                await conn.logout(self.limits.logout_timeout)
        finally:  # cancelled (shutdown) or done: the socket is closed either way
            conn.abandon()

    async def maintain(self) -> None:
        """Close expired and dead pooled connections until cancelled; then log out every pooled
        connection (rule 5) and pool nothing more."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                while True:
                    await trio.sleep(SWEEP_INTERVAL)
                    self._sweep()
        finally:
            self._nursery = None
            self._closed = True
            idle = [entry.conn for pool in self._pools.values() for entry in pool.idle]
            self._pools.clear()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.limits.logout_timeout):
                    async with trio.open_nursery() as nursery:
                        for conn in idle:
                            nursery.start_soon(conn.logout, self.limits.logout_timeout)
                for conn in idle:
                    await conn.aclose()

    def _sweep(self) -> None:
        now = trio.current_time()
        for pool in self._pools.values():
            keep = []
            for entry in pool.idle:
                if now - entry.since > self.limits.upstream_pool_idle:
                    self._retire(entry.conn, "idle for limits.upstream_pool_idle")
                elif entry.conn.data_waiting() or not entry.conn.usable:
                    self._retire(entry.conn, "the server sent something (BYE?)", polite=False)
                else:
                    keep.append(entry)
            pool.idle = keep

    def update_limits(self, limits: Limits) -> None:
        self.limits = limits
        if not self.enabled:
            self.retire_all("the pool was turned off")

