"""The upstream connector: logged-in upstream IMAP connections, within each account's cap.

Theory of operation
-------------------
One :class:`UpstreamConnector` is built per gateway (:func:`gateway.app.build_context`) and
reached by the front ends through the context; it implements
:class:`gateway.ports.UpstreamConnector`.

* It owns the per-account connection caps: one :class:`~gateway.upstream.slots.UpstreamSlots`
  per ``[users.X]`` name, made on first use, so the IMAP and POP3 sessions of one account share
  one cap (``limits.upstream_connections_per_account``).
* :meth:`UpstreamConnector.open` takes a slot and logs in
  (:func:`gateway.upstream.login.open_upstream`); the connection it returns holds the slot and
  releases it when closed.
* A config reload (:meth:`UpstreamConnector.update_config`) keeps an account's slots when its
  cap is unchanged -- running sessions hold them, and new sessions must count against the same
  cap -- and applies the new ``limits.upstream_slot_wait`` to them; an account whose cap
  changed gets new slots (the old connections release into the old object, which nobody else
  uses any more); the slots of removed users are forgotten.
* It owns the pool of logged-in connections (:mod:`gateway.upstream.pool`): :meth:`open`
  first asks the pool for a connection of the account logged in with the account's current
  access token, and only then takes a slot and logs in (after closing a pooled connection if
  the cap is full); :meth:`release` gives a connection back -- pooled if clean, else logged
  out. :meth:`maintain` is the pool's task (the server runs it; when it ends, pooled
  connections are logged out). A config reload closes the pooled connections of every
  account whose user or provider settings changed or that was removed.
* Events (``upstream.connected`` / ``upstream.error``) go to the ``publish`` callable it was
  built with; a reused connection is no new login and publishes nothing.
"""

from __future__ import annotations

import weakref

from ..config import Config, Limits
from ..errors import ReauthorizationRequired
from ..ports import TokenSource
from .client import UpstreamIMAP
from .login import Publish, open_upstream, token_fingerprint
from .pool import UpstreamPool
from .slots import UpstreamSlots, kept_slots

__all__ = ["UpstreamConnector"]


class UpstreamConnector:
    def __init__(self, config: Config, *, publish: Publish | None = None):
        self._limits: Limits = config.limits
        self._config = config
        self._publish = publish
        self._slots: dict[str, UpstreamSlots] = {}
        self.pool = UpstreamPool(config.limits)
        self._owner: weakref.WeakKeyDictionary[UpstreamIMAP, str] = weakref.WeakKeyDictionary()

    def slots(self, account: str) -> UpstreamSlots:
        """The connection cap of ``account`` (a ``[users.X]`` name)."""
        slots = self._slots.get(account)
        if slots is None:
            slots = UpstreamSlots(
                account,
                capacity=self._limits.upstream_connections_per_account,
                wait=self._limits.upstream_slot_wait,
            )
            self._slots[account] = slots
        return slots

    async def open(
        self, account: TokenSource, *, accept: frozenset[str] = frozenset()
    ) -> UpstreamIMAP:
        slots = self.slots(account.name)
        conn = None
        if self.pool.idle_count(account.name):
            try:
                credential = token_fingerprint(await account.access_token())
            except ReauthorizationRequired:
                self.pool.retire_account(account.name, "the account's grant no longer works")
                raise
            conn = await self.pool.take(account.name, credential, accept=accept)
            if conn is None:
                self.pool.make_room(account.name, slots.in_use, slots.capacity)
        if conn is None:
            conn = await open_upstream(account, self._limits, slots=slots, publish=self._publish)
        self._owner[conn] = account.name
        return conn

    async def release(self, conn: UpstreamIMAP, *, clean: bool) -> None:
        account = self._owner.pop(conn, None)
        slots = self._slots.get(account) if account is not None else None
        if account is None or slots is None or account not in self._config.users:
            await conn.logout(self._limits.logout_timeout)
            return
        await self.pool.put(account, conn, clean=clean, waiting=slots.waiting)

    async def maintain(self) -> None:
        await self.pool.maintain()

    def update_config(self, config: Config) -> None:
        limits = config.limits
        kept = kept_slots(self._slots, config.users, limits.upstream_connections_per_account,
                          limits.upstream_slot_wait)
        old = self._config
        for name in self._slots:
            user, before = config.users.get(name), old.users.get(name)
            if (name not in kept or user is None or before is None or user != before
                    or config.provider_for(user) != old.provider_for(before)):
                self.pool.retire_account(name, "the account's configuration changed")
        self._slots, self._limits, self._config = kept, limits, config
        self.pool.update_limits(limits)
