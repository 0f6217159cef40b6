"""Local passwords: argon2 verifiers, the bounded KDF thread pool and the verified-credential cache.

Theory of operation
-------------------
A legacy client sends its local password on every connection (a scanner polling POP3 every
minute, a phone opening five IMAP connections at once). Checking it costs an argon2
verification (~0.2 s of CPU) plus, for password-wrapped accounts, a scrypt derivation to unwrap
the account's data key. Doing that on every connection would let a handful of devices saturate
the machine, so:

* :class:`KdfPool` runs every slow derivation in a worker thread, at most
  ``limits.kdf_concurrency`` at once, so the trio loop never stalls and a flood of logins
  cannot take every core. It counts derivations (``runs``) for metrics and tests. Waiting
  derivations are not one first-come-first-served queue, which a flood of guesses would fill
  ahead of everyone else:

  - the *priority lane* (``lane=None``: a login from an address remembered for its user, the
    admin plane, the CLI) is always served first, and one of the workers is kept for it (the
    ordinary lanes use at most ``concurrency - 1`` at once, at least one): a flood never has
    every core hashing when a device in good standing arrives;
  - every other login waits in the *lane of its client address*; lanes are served in turn,
    one derivation each, so a flooding address delays a newcomer by at most one derivation
    per other waiting address, however much it sends;
  - the ordinary lanes hold at most ``limits.kdf_queue_length`` waiters in all: beyond that
    :class:`KdfBusy` is raised at once (the caller answers "try again later") instead of
    queueing work nobody will wait for. Known and unknown user names share these lanes, so
    this refusal says nothing about which names exist.
* :class:`CredentialCache` remembers credentials verified recently. Its key is an HMAC, under a
  random per-process key, of (user, password, stored verifier): the password itself is never
  kept, a changed password (new verifier) never matches an old entry, and the cache is bounded
  (LRU) with a time limit per entry.

argon2-cffi is used rather than cryptography's Argon2id, which was seen to hang when two threads
derive at once (cryptography 50.0.x).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TypeVar

import argon2
import trio

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024  # bounds the work an attacker can ask the KDF to do
CACHE_MAX_ENTRIES = 4096
CACHE_TTL = 15 * 60.0  # seconds a verified credential is trusted without a new derivation
#: Derivations allowed to wait in the ordinary lanes (``limits.kdf_queue_length``).
DEFAULT_MAX_QUEUED = 64

# RFC 9106's "second recommended" low-memory profile (argon2-cffi's default): t=3, m=64 MiB, p=4.
_HASHER = argon2.PasswordHasher()
_DUMMY_HASH: str | None = None

T = TypeVar("T")


def check_password_policy(password: str) -> None:
    """Raise ValueError with a user-facing reason when a new local password is not acceptable."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"the password must have at most {MAX_PASSWORD_LENGTH} characters")
    if any(c in password for c in "\r\n\x00"):
        raise ValueError("the password must not contain line breaks or NUL")


def hash_password(password: str) -> str:
    """A new argon2id verifier (PHC string). Slow: call it through a :class:`KdfPool`."""
    return _HASHER.hash(password)


def verify_password(verifier: str, password: str) -> bool:
    """Whether ``password`` matches ``verifier``. Slow: call it through a :class:`KdfPool`."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        return _HASHER.verify(verifier, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def burn_verification(password: str) -> bool:
    """Spend the time of one verification for an unknown user, so that timing does not reveal
    which user names exist. Always False."""
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))
    verify_password(_DUMMY_HASH, password[:MAX_PASSWORD_LENGTH])
    return False


class KdfBusy(Exception):
    """The KDF queue of ordinary logins is full: refuse at once, as a temporary failure."""


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.granted = False


class KdfPool:
    """Runs slow derivations off the trio thread, at most ``concurrency`` at a time, the
    priority lane first and the others in turn (see the module docstring)."""

    def __init__(self, concurrency: int, *, max_queued: int = DEFAULT_MAX_QUEUED):
        if concurrency < 1 or max_queued < 0:
            raise ValueError("concurrency >= 1 and max_queued >= 0")
        self.concurrency = concurrency
        #: Derivations of the ordinary lanes at once: one worker is kept for the priority lane.
        self.ordinary_limit = max(1, concurrency - 1)
        self.max_queued = max_queued
        self._running = 0
        self._running_ordinary = 0
        self._priority: deque[_Waiter] = deque()
        self._lanes: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self._queued = 0  # waiters in the ordinary lanes
        self.runs = 0
        self.refused = 0  # derivations refused because the ordinary lanes were full

    @property
    def waiting(self) -> int:
        return len(self._priority) + self._queued

    async def run(self, fn: Callable[..., T], *args: object, lane: str | None = None) -> T:
        """Run ``fn(*args)`` in a worker thread. ``lane=None``: the priority lane (devices in
        good standing, the admin plane, the CLI); otherwise the ordinary lane of that client
        address. Raises :class:`KdfBusy` when the ordinary lanes hold ``max_queued`` waiters."""
        ordinary = lane is not None
        await self._acquire(lane)
        try:
            self.runs += 1
            return await trio.to_thread.run_sync(fn, *args)
        finally:
            self._release(ordinary)

    def _may_start(self, ordinary: bool) -> bool:
        if self._running >= self.concurrency:
            return False
        return not ordinary or self._running_ordinary < self.ordinary_limit

    def _start(self, ordinary: bool) -> None:
        self._running += 1
        self._running_ordinary += ordinary

    async def _acquire(self, lane: str | None) -> None:
        ordinary = lane is not None
        queue_empty = not self._lanes if ordinary else not self._priority
        if queue_empty and self._may_start(ordinary):
            self._start(ordinary)
            await trio.lowlevel.checkpoint()
            return
        if lane is not None and self._queued >= self.max_queued:
            self.refused += 1
            raise KdfBusy
        waiter = _Waiter()
        if lane is None:
            self._priority.append(waiter)
        else:
            self._lanes.setdefault(lane, deque()).append(waiter)
            self._queued += 1
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self._release(ordinary)  # granted while being cancelled: pass it on
            else:
                self._withdraw(waiter, lane)
            raise

    def _withdraw(self, waiter: _Waiter, lane: str | None) -> None:
        if lane is None:
            self._priority.remove(waiter)
            return
        queue = self._lanes[lane]
        queue.remove(waiter)
        self._queued -= 1
        if not queue:
            del self._lanes[lane]

    def _release(self, ordinary: bool) -> None:
        self._running -= 1
        self._running_ordinary -= ordinary
        self._dispatch()

    def _dispatch(self) -> None:
        """Start waiters while workers are free: the priority lane first, then the ordinary
        lanes in turn (one derivation each per turn) up to :attr:`ordinary_limit`."""
        while True:
            if self._priority and self._may_start(False):
                waiter, ordinary = self._priority.popleft(), False
            elif self._lanes and self._may_start(True):
                lane, queue = next(iter(self._lanes.items()))
                waiter, ordinary = queue.popleft(), True
                self._queued -= 1
                del self._lanes[lane]
                if queue:
                    self._lanes[lane] = queue  # to the back of the turn
            else:
                return
            self._start(ordinary)
            waiter.granted = True
            waiter.event.set()


class CredentialCache:
    """Bounded, expiring memory of recently verified (user, password) pairs."""

    def __init__(
        self,
        *,
        max_entries: int = CACHE_MAX_ENTRIES,
        ttl: float = CACHE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self._max_entries = max_entries
        self._ttl = ttl
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def _digest(self, user: str, password: str, verifier: str) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (user, password, verifier):
            data = part.encode("utf-8", "surrogatepass")
            mac.update(len(data).to_bytes(8, "big") + data)
        return mac.digest()

    def key_of(self, user: str, password: str, verifier: str) -> bytes:
        """The cache key of a credential (an HMAC: it reveals nothing of the password)."""
        return self._digest(user, password, verifier)

    def check(self, user: str, password: str, verifier: str) -> bool:
        digest = self._digest(user, password, verifier)
        expires = self._entries.get(digest)
        if expires is None:
            return False
        if expires <= self._clock():
            del self._entries[digest]
            return False
        self._entries.move_to_end(digest)
        return True

    def remember(self, user: str, password: str, verifier: str) -> None:
        digest = self._digest(user, password, verifier)
        self._entries[digest] = self._clock() + self._ttl
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
