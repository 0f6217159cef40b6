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
* Events (``upstream.connected`` / ``upstream.error``) go to the ``publish`` callable it was
  built with.
"""

from __future__ import annotations

from ..config import Config, Limits
from ..ports import TokenSource
from .client import UpstreamIMAP
from .login import Publish, open_upstream
from .slots import UpstreamSlots, kept_slots

__all__ = ["UpstreamConnector"]


class UpstreamConnector:
    def __init__(self, config: Config, *, publish: Publish | None = None):
        self._limits: Limits = config.limits
        self._publish = publish
        self._slots: dict[str, UpstreamSlots] = {}

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

    async def open(self, account: TokenSource) -> UpstreamIMAP:
        return await open_upstream(
            account, self._limits, slots=self.slots(account.name), publish=self._publish
        )

    def update_config(self, config: Config) -> None:
        limits = config.limits
        self._slots = kept_slots(self._slots, config.users, limits.upstream_connections_per_account,
                                 limits.upstream_slot_wait)
        self._limits = limits
