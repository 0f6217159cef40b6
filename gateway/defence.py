"""Authentication defence: per-IP and per-user penalties that grow with failures and decay.

Theory of operation
-------------------
Every login attempt is first shown to :class:`AuthThrottle`, which keeps two small tables of
*penalty scores*: one keyed by the client's network address (an IPv4 address, or the /64 of an
IPv6 address: one host owns a whole /64), one keyed by the user name as typed (case-folded).
A failed login adds one point to both; time removes points again, one per
:data:`PENALTY_DECAY_INTERVAL` seconds without a failure, so a device that once had a stale
password is forgiven within minutes while a guessing run keeps its score high.

``check(peer, user)`` turns the two scores into a :class:`Verdict`:

* ``delay`` -- how long to wait before the attempt is even looked at. The higher of the two
  scores decides: no penalty → 0; *n* points → ``base_delay · 2**(n-1)``, capped at
  :data:`MAX_PENALTY_DELAY` (Dovecot's auth penalty: 2 s doubling up to 15 s).
* ``refuse`` -- at :data:`REFUSE_AFTER_FAILURES` points the attempt is refused *without*
  checking the password: the penalty delay alone does not stop a client that opens a hundred
  connections and guesses in parallel. A refused attempt costs no password derivation, and its
  caller answers it *exactly* like a wrong password (same delay, same words): the client cannot
  tell throttling from a bad password, so it learns nothing about which user names exist or
  whether its last guess was right.

``record_failure`` adds the points, ``record_success`` clears both entries (the user proved who
they are from that address). Clearing the address entry does not help a guesser who owns one
valid account: the *user* table still throttles guesses at the other user's password.

Memory is bounded: each table is an LRU of at most :data:`MAX_TRACKED` entries, so a flood of
random user names or addresses cannot grow it; the oldest (least recently failed) entries go
first. Entries whose score has decayed to zero are dropped when next seen.

The clock is injectable (``clock=trio.current_time`` in tests with ``autojump_clock``); the
default is :func:`time.monotonic`. Nothing here sleeps: callers await ``verdict.delay``.

:func:`constant_time_equal` is the one comparison to use for secrets anywhere in mailgate.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: Dovecot's AUTH_PENALTY_MAX_SECS: no penalty delay is longer than this (seconds).
MAX_PENALTY_DELAY = 15.0
#: One penalty point is forgiven per this many seconds without a new failure.
PENALTY_DECAY_INTERVAL = 60.0
#: With this many outstanding failures, attempts are refused without checking the password.
REFUSE_AFTER_FAILURES = 10
#: Entries kept per table (addresses, users); least recently failed are forgotten first.
MAX_TRACKED = 10_000
#: IPv6 clients are tracked per prefix of this length (one host usually owns a whole /64).
IPV6_PREFIX = 64
#: The default base delay when no limit is given (``limits.auth_failure_delay``).
DEFAULT_BASE_DELAY = 2.0


def constant_time_equal(a: str | bytes, b: str | bytes) -> bool:
    """Compare two secrets in time independent of where they differ."""
    if isinstance(a, str):
        a = a.encode("utf-8", "surrogatepass")
    if isinstance(b, str):
        b = b.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(a, b)


def address_key(peer: str) -> str:
    """The penalty key of a client address: the IPv4 address, or the /64 of an IPv6 one."""
    host = peer.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an address (a Unix socket path, a test name): tracked as is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{IPV6_PREFIX}", strict=False))
    return str(ip)


def user_key(user: str) -> str:
    return user.casefold()


@dataclass(frozen=True)
class Verdict:
    """What to do with one login attempt."""

    delay: float  # seconds to wait before checking (or refusing) the attempt
    refuse: bool  # True: answer "authentication failed" without checking the password


ALLOW = Verdict(0.0, False)


def _outstanding(score: float) -> int:
    """Failures still counted: a partly decayed one counts whole until it is forgiven."""
    return math.ceil(score - 1e-9)


class _Penalties:
    """One LRU table: key -> (score, time of the last change)."""

    def __init__(self, *, decay_interval: float, max_entries: int, clock: Callable[[], float]):
        self._entries: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._decay_interval = decay_interval
        self._max_entries = max_entries
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def score(self, key: str) -> float:
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        score = self._decayed(*entry)
        if score <= 0:
            del self._entries[key]
        return score

    def add(self, key: str) -> float:
        score = self.score(key) + 1
        self._entries[key] = (score, self._clock())
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return score

    def clear(self, key: str) -> None:
        self._entries.pop(key, None)

    def _decayed(self, score: float, since: float) -> float:
        elapsed = max(0.0, self._clock() - since)
        return max(0.0, score - elapsed / self._decay_interval)


class AuthThrottle:
    """Per-IP and per-user login penalties; see the module docstring."""

    def __init__(
        self,
        *,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = MAX_PENALTY_DELAY,
        decay_interval: float = PENALTY_DECAY_INTERVAL,
        refuse_after: int = REFUSE_AFTER_FAILURES,
        max_tracked: int = MAX_TRACKED,
        clock: Callable[[], float] = time.monotonic,
    ):
        if decay_interval <= 0 or refuse_after < 1 or max_tracked < 1:
            raise ValueError("decay_interval > 0, refuse_after >= 1 and max_tracked >= 1")
        self.base_delay = base_delay
        self.max_delay = max(max_delay, base_delay)
        self.refuse_after = refuse_after
        table = {"decay_interval": decay_interval, "max_entries": max_tracked, "clock": clock}
        self._by_address = _Penalties(**table)  # type: ignore[arg-type]
        self._by_user = _Penalties(**table)  # type: ignore[arg-type]
        self.refused = 0  # attempts refused unchecked, for metrics

    @property
    def tracked(self) -> tuple[int, int]:
        """(addresses, users) currently holding a penalty."""
        return len(self._by_address), len(self._by_user)

    def penalty(self, peer: str, user: str) -> float:
        """The outstanding failure score that counts for this attempt (the higher of the two)."""
        return max(self._by_address.score(address_key(peer)), self._by_user.score(user_key(user)))

    def delay_for(self, peer: str, user: str) -> float:
        return self._delay(self.penalty(peer, user))

    def check(self, peer: str, user: str) -> Verdict:
        score = self.penalty(peer, user)
        if score <= 0:
            return ALLOW
        refuse = _outstanding(score) >= self.refuse_after
        if refuse:
            self.refused += 1
        return Verdict(self._delay(score), refuse)

    def record_failure(self, peer: str, user: str) -> None:
        self._by_address.add(address_key(peer))
        self._by_user.add(user_key(user))

    def record_success(self, peer: str, user: str) -> None:
        self._by_address.clear(address_key(peer))
        self._by_user.clear(user_key(user))

    def _delay(self, score: float) -> float:
        if score <= 0:
            return 0.0
        doublings = max(0, _outstanding(score) - 1)
        if doublings >= 32:  # 2**32 · base is far beyond any cap; avoid huge floats
            return self.max_delay
        return min(self.max_delay, self.base_delay * (2**doublings))
