"""The per-account cap on upstream IMAP connections.

Theory of operation
-------------------
Providers limit how many IMAP connections one mailbox may hold at once (Gmail 15, Microsoft 365
about 16) and answer the next login with ``Too many simultaneous connections`` -- or, worse,
quietly drop an older session. A household's phones, laptops and a scanner easily exceed that,
so mailgate keeps its own, lower count (``limits.upstream_connections_per_account``) and makes
the surplus *wait* instead:

* :meth:`UpstreamSlots.acquire` returns a :class:`Slot` at once when the account has one free;
  otherwise it waits, first come first served, for at most ``limits.upstream_slot_wait`` seconds
  and then raises :class:`~gateway.errors.TemporaryFailure` -- which the front ends answer as a
  clear temporary error (IMAP ``NO [UNAVAILABLE]``, POP3 ``-ERR [SYS/TEMP]``), so the client
  retries later rather than reporting a broken account.
* A :class:`Slot` is held for the lifetime of the upstream connection and released exactly once
  (:meth:`Slot.release` is idempotent), on every path: the upstream client releases it when it is
  closed, and ``with slot:`` releases it when a login fails half-way.

One :class:`UpstreamSlots` exists per account (the
:class:`~gateway.upstream.connector.UpstreamConnector` holds them), so IMAP and POP3 sessions
of one account share the same cap. It imports trio but
does no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from types import TracebackType

import trio

from ..errors import TemporaryFailure

log = logging.getLogger("mailgate.upstream")

SLOT_WAIT_EXCEEDED = "too many upstream connections for this account; try again later"


class Slot:
    """One upstream connection's place in its account's cap."""

    def __init__(self, owner: "UpstreamSlots"):
        self._owner = owner
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._owner._release()

    def __enter__(self) -> "Slot":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class UpstreamSlots:
    """At most ``capacity`` upstream connections for one account; others wait ``wait`` seconds."""

    def __init__(self, account: str, *, capacity: int, wait: float):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.account = account
        self.capacity = capacity
        self.wait = wait
        self._semaphore = trio.Semaphore(capacity)
        self.waiting = 0
        self.refused = 0  # acquisitions that gave up, for metrics
        self.peak = 0  # most slots ever held at once

    @property
    def in_use(self) -> int:
        return self.capacity - self._semaphore.value

    async def acquire(self) -> Slot:
        """A slot, waiting at most ``wait`` seconds; raises TemporaryFailure after that."""
        try:
            self._semaphore.acquire_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return self._granted()
        if self._semaphore.value == 0:
            log.info(
                "account %s: all %d upstream connections in use; waiting up to %gs",
                self.account, self.capacity, self.wait,
            )
        self.waiting += 1
        try:
            with trio.move_on_after(self.wait):
                await self._semaphore.acquire()
                return self._granted()
        finally:
            self.waiting -= 1
        self.refused += 1
        log.warning(
            "account %s: no upstream connection free after %gs (limit %d: "
            "limits.upstream_connections_per_account)", self.account, self.wait, self.capacity,
        )
        raise TemporaryFailure(SLOT_WAIT_EXCEEDED)

    def _granted(self) -> Slot:
        self.peak = max(self.peak, self.in_use)
        return Slot(self)

    def _release(self) -> None:
        self._semaphore.release()


def kept_slots(slots: dict[str, UpstreamSlots], users: Collection[str], capacity: int,
               wait: float) -> dict[str, UpstreamSlots]:
    """A config reload: the caps of accounts still configured whose capacity is unchanged are
    kept (running sessions hold them) and get the new ``wait``; the others are forgotten (an
    account whose cap changed gets a new one on first use)."""
    kept: dict[str, UpstreamSlots] = {}
    for name, cap in slots.items():
        if name in users and cap.capacity == capacity:
            cap.wait = wait
            kept[name] = cap
    return kept
