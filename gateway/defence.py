"""Authentication defence: login penalties with reservations, and remembered good addresses.

Theory of operation
-------------------
The rules, written from the attacker's side (each one is a guarantee in docs/security.md):

1. **Reserve before checking.** Every login attempt is shown to :meth:`AuthThrottle.begin`
   *before* the password is checked. It returns an :class:`Attempt` that already counts as one
   *pending* failure for the client's address and for the user name, until it is settled:
   :meth:`Attempt.failed` turns it into a failure point, :meth:`Attempt.succeeded` clears the
   address (not the user: a good login says nothing about guesses from elsewhere),
   :meth:`Attempt.release` (no check happened: the client left, the KDF
   was busy) drops it. So forty guesses sent at once are counted like forty guesses sent one
   after the other: no more than the allowance is ever checked.
2. **Two scores.** Keys: the client's network address (an IPv4 address, or the /64 of an IPv6
   one: one host owns a whole /64) and the user name (case-folded). A score is failures plus
   pending attempts; time forgives failures (one per *decay interval* without a new one).
   An attempt is *refused* -- answered like a wrong password, with no password check -- when

   * its address has ``refuse_after`` (10) outstanding, forgiven one per 60 s: at most 10 real
     checks from a fresh address, then one a minute; or
   * the address is not remembered for the user (rule 3) and the user has
     ``user_refuse_after`` (30) outstanding, forgiven one per 20 s: at most 30 checks for one
     user from all the addresses it does not know, then three a minute. One or two guessing
     addresses (each capped by the first rule at one a minute) never get the user there, so a
     new device of that user is slowed, never refused, by them.

   Otherwise the attempt first waits ``base_delay · 2**(n-1)`` for *n* outstanding (capped at
   :data:`MAX_PENALTY_DELAY`, 15 s, Dovecot's auth penalty), *n* being the address score, or the
   higher of the two for an address the user does not know.
3. **Working devices keep working.** :class:`TrustedAddresses` remembers, per user, the
   addresses (keys as above) that logged in correctly, with a sliding expiry
   (``limits.trusted_address_days``); :class:`gateway.oauth.accounts.AccountManager` keeps them
   in the state store, so they survive a restart. For a remembered address the *user* score is
   ignored: failures from elsewhere never refuse or delay it. Only its own address score counts
   (a device behind the same address as the guesser shares its fate: the address is all that
   tells them apart).
4. **Refused attempts change nothing.** They insert no entry and add no point, so they cannot
   churn the tables; a refused address is checked again once its score has decayed.
5. **Bounded tables that keep what matters.** Addresses and unknown user names live in LRU
   tables of at most :data:`MAX_TRACKED` entries each; entries with an attempt in flight are
   kept. The scores of *configured* users (``known=True``) live in a table of their own that
   names can never evict: a flood of random names cannot wash out the penalty of a real user.

Nothing here sleeps or does I/O: callers await ``verdict.delay``, and persist what
:meth:`TrustedAddresses.remember` says must be written. The clocks are injectable
(``trio.current_time`` in tests with ``autojump_clock``; penalties use a monotonic clock,
remembered addresses wall-clock time because they outlive the process).

:func:`constant_time_equal` is the one comparison to use for secrets anywhere in mailgate.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

#: Dovecot's AUTH_PENALTY_MAX_SECS: no penalty delay is longer than this (seconds).
MAX_PENALTY_DELAY = 15.0
#: One penalty point of an address is forgiven per this many seconds without a new failure.
PENALTY_DECAY_INTERVAL = 60.0
#: With this many outstanding failures an address is refused without checking the password.
REFUSE_AFTER_FAILURES = 10
#: The per-user allowance for addresses the user does not know, as a multiple of the address
#: one: refused at ``USER_ALLOWANCE_FACTOR · refuse_after`` outstanding, forgiven
#: ``USER_ALLOWANCE_FACTOR`` times faster (so up to that many guessing addresses, each held to
#: one check per decay interval, never lock a user's new devices out).
USER_ALLOWANCE_FACTOR = 3
#: Entries kept per table (addresses, unknown user names); least recently failed go first.
MAX_TRACKED = 10_000
#: IPv6 clients are tracked per prefix of this length (one host usually owns a whole /64).
IPV6_PREFIX = 64
#: The default base delay when no limit is given (``limits.auth_failure_delay``).
DEFAULT_BASE_DELAY = 2.0
#: Remembered addresses kept per user (the oldest seen is forgotten first).
MAX_TRUSTED_PER_USER = 64
#: A remembered address's "last seen" is written again at most this often (seconds): the
#: sliding expiry is counted in days, so a daily write keeps it exact enough.
TRUSTED_REFRESH_INTERVAL = 24 * 3600.0


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


class _Entry:
    __slots__ = ("score", "since", "pending")

    def __init__(self, score: float, since: float) -> None:
        self.score = score  # failure points as of `since`
        self.since = since
        self.pending = 0  # attempts reserved and not settled yet


class _Penalties:
    """One table: key -> failure score (decaying) and attempts in flight. ``max_entries=None``:
    unbounded (configured users only); otherwise least recently changed entries go first,
    never one with an attempt in flight."""

    def __init__(self, *, decay_interval: float, max_entries: int | None,
                 clock: Callable[[], float]):
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._decay_interval = decay_interval
        self._max_entries = max_entries
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def score(self, key: str) -> float:
        """Decayed failure points (pending attempts not included)."""
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        score = self._decayed(entry)
        if score <= 0 and entry.pending == 0:
            del self._entries[key]
        return score

    def outstanding(self, key: str) -> int:
        """Failures still counted plus attempts in flight."""
        score = self.score(key)
        entry = self._entries.get(key)
        return _outstanding(score) + (entry.pending if entry is not None else 0)

    def add(self, key: str) -> None:
        entry = self._touch(key)
        entry.score += 1

    def reserve(self, key: str) -> None:
        self._touch(key).pending += 1

    def settle(self, key: str, *, failed: bool) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.pending = max(0, entry.pending - 1)
        if failed:
            self.add(key)
        else:
            self.score(key)  # drops the entry if nothing is left

    def clear(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        if entry.pending:
            entry.score, entry.since = 0.0, self._clock()
        else:
            del self._entries[key]

    def _touch(self, key: str) -> _Entry:
        """The entry of ``key`` with its score brought up to now, made the most recent."""
        now = self._clock()
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(0.0, now)
            self._evict()
        else:
            entry.score, entry.since = self._decayed(entry), now
            self._entries.move_to_end(key)
        return entry

    def _evict(self) -> None:
        if self._max_entries is None:
            return
        skipped = 0
        while len(self._entries) > self._max_entries and skipped < len(self._entries):
            key, entry = next(iter(self._entries.items()))
            if entry.pending:  # in flight: keep it (it is settled soon), look at the next
                self._entries.move_to_end(key)
                skipped += 1
                continue
            del self._entries[key]

    def _decayed(self, entry: _Entry) -> float:
        elapsed = max(0.0, self._clock() - entry.since)
        return max(0.0, entry.score - elapsed / self._decay_interval)


class Attempt:
    """One login attempt reserved by :meth:`AuthThrottle.begin`; settle it exactly once
    (later calls do nothing). A refused attempt reserved nothing and records nothing."""

    def __init__(self, throttle: "AuthThrottle", verdict: Verdict,
                 keys: tuple[str, str, bool] | None):
        self.verdict = verdict
        self._throttle = throttle
        self._keys = keys  # (address key, user key, known user) while unsettled

    @property
    def refused(self) -> bool:
        return self.verdict.refuse

    def failed(self) -> None:
        """The password was checked and is wrong (or the user unknown): one point each."""
        self._settle(failed=True)

    def succeeded(self) -> None:
        """The right password: the address is forgiven. The user's score is not: it counts
        guesses from elsewhere, which one good login disproves nothing about."""
        keys, self._keys = self._keys, None
        if keys is not None:
            self._throttle._settle(keys, failed=False)
            self._throttle._by_address.clear(keys[0])

    def release(self) -> None:
        """No password check happened (the client left, the KDF was busy): count nothing."""
        self._settle(failed=False)

    def _settle(self, *, failed: bool) -> None:
        keys, self._keys = self._keys, None
        if keys is not None:
            self._throttle._settle(keys, failed=failed)


class AuthThrottle:
    """Per-address and per-user login penalties; see the module docstring."""

    def __init__(
        self,
        *,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = MAX_PENALTY_DELAY,
        decay_interval: float = PENALTY_DECAY_INTERVAL,
        refuse_after: int = REFUSE_AFTER_FAILURES,
        user_decay_interval: float | None = None,
        user_refuse_after: int | None = None,
        max_tracked: int = MAX_TRACKED,
        clock: Callable[[], float] = time.monotonic,
    ):
        if user_decay_interval is None:
            user_decay_interval = decay_interval / USER_ALLOWANCE_FACTOR
        if user_refuse_after is None:
            user_refuse_after = refuse_after * USER_ALLOWANCE_FACTOR
        if (decay_interval <= 0 or user_decay_interval <= 0 or refuse_after < 1
                or user_refuse_after < 1 or max_tracked < 1):
            raise ValueError("decay intervals > 0, refusal thresholds >= 1, max_tracked >= 1")
        self.base_delay = base_delay
        self.max_delay = max(max_delay, base_delay)
        self.refuse_after = refuse_after
        self.user_refuse_after = user_refuse_after
        self._by_address = _Penalties(decay_interval=decay_interval, max_entries=max_tracked,
                                      clock=clock)
        # Configured users: never evicted. Unknown names: bounded, evicted first come.
        self._by_user = _Penalties(decay_interval=user_decay_interval, max_entries=None,
                                   clock=clock)
        self._by_name = _Penalties(decay_interval=user_decay_interval,
                                   max_entries=max_tracked, clock=clock)
        self.refused = 0  # attempts refused unchecked, for metrics

    @property
    def tracked(self) -> tuple[int, int]:
        """(addresses, user names) currently holding a penalty."""
        return len(self._by_address), len(self._by_user) + len(self._by_name)

    def _users(self, known: bool) -> _Penalties:
        return self._by_user if known else self._by_name

    def penalty(self, peer: str, user: str, *, known: bool = False,
                trusted: bool = False) -> int:
        """The outstanding failures (pending attempts included) that count for this attempt:
        the address's, or the higher of address and user for an address the user does not
        know."""
        by_address = self._by_address.outstanding(address_key(peer))
        if trusted:
            return by_address
        return max(by_address, self._users(known).outstanding(user_key(user)))

    def delay_for(self, peer: str, user: str, *, known: bool = False,
                  trusted: bool = False) -> float:
        return self._delay(self.penalty(peer, user, known=known, trusted=trusted))

    def check(self, peer: str, user: str, *, known: bool = False,
              trusted: bool = False) -> Verdict:
        """The verdict for an attempt now, without reserving it (see :meth:`begin`)."""
        verdict = self._verdict(peer, user, known=known, trusted=trusted)
        if verdict.refuse:
            self.refused += 1
        return verdict

    def begin(self, peer: str, user: str, *, known: bool = False,
              trusted: bool = False) -> Attempt:
        """Judge an attempt and, unless it is refused, reserve it: it counts as a failure of
        its address and user until settled. ``known``: ``user`` is a configured user;
        ``trusted``: ``peer`` is remembered for that user (:class:`TrustedAddresses`)."""
        verdict = self.check(peer, user, known=known, trusted=trusted)
        if verdict.refuse:
            return Attempt(self, verdict, None)
        keys = (address_key(peer), user_key(user), known)
        self._by_address.reserve(keys[0])
        self._users(known).reserve(keys[1])
        return Attempt(self, verdict, keys)

    def record_failure(self, peer: str, user: str, *, known: bool = False) -> None:
        self._by_address.add(address_key(peer))
        self._users(known).add(user_key(user))

    def record_success(self, peer: str, user: str, *, known: bool = False) -> None:
        """Forgive both the address and the user (a reset; logins use :meth:`begin`)."""
        self._by_address.clear(address_key(peer))
        self._users(known).clear(user_key(user))

    def forgive_address(self, peer: str) -> None:
        """The address proved a password (without a reserved check: a cached credential)."""
        self._by_address.clear(address_key(peer))

    def _verdict(self, peer: str, user: str, *, known: bool, trusted: bool) -> Verdict:
        by_address = self._by_address.outstanding(address_key(peer))
        by_user = 0 if trusted else self._users(known).outstanding(user_key(user))
        if by_address >= self.refuse_after or by_user >= self.user_refuse_after:
            return Verdict(self._delay(max(by_address, by_user)), True)
        score = max(by_address, by_user)
        return ALLOW if score <= 0 else Verdict(self._delay(score), False)

    def _settle(self, keys: tuple[str, str, bool], *, failed: bool) -> None:
        address, user, known = keys
        self._by_address.settle(address, failed=failed)
        self._users(known).settle(user, failed=failed)

    def _delay(self, outstanding: int) -> float:
        if outstanding <= 0:
            return 0.0
        doublings = outstanding - 1
        if doublings >= 32:  # 2**32 · base is far beyond any cap; avoid huge floats
            return self.max_delay
        return min(self.max_delay, self.base_delay * 2.0**doublings)


class TrustedAddresses:
    """Per user, the addresses that logged in correctly, with a sliding expiry.

    An address is kept as an HMAC (under ``secret``, the store's own key) of its penalty key
    (:func:`address_key`), so the store never holds client addresses in clear. ``remember``
    says when the caller must persist a (user, digest, seen) row: for a new address, or when
    the stored "last seen" is older than :data:`TRUSTED_REFRESH_INTERVAL`."""

    def __init__(self, secret: bytes, *, ttl: float,
                 clock: Callable[[], float] = time.time,
                 max_per_user: int = MAX_TRUSTED_PER_USER):
        self._secret = secret
        self.ttl = ttl
        self._clock = clock
        self._max_per_user = max_per_user
        # user -> digest -> (last seen, last written), most recently seen last
        self._users: dict[str, OrderedDict[bytes, tuple[float, float]]] = {}

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._users.values())

    def digest(self, peer: str) -> bytes:
        return hmac.new(self._secret, address_key(peer).encode("utf-8", "surrogatepass"),
                        hashlib.sha256).digest()

    def load(self, rows: Iterable[tuple[str, bytes, float]]) -> None:
        """Add stored (user, digest, last seen) rows, oldest first; expired ones are skipped."""
        for user, digest, seen in sorted(rows, key=lambda row: row[2]):
            if seen + self.ttl > self._clock():
                self._put(user_key(user), digest, seen, seen)

    def contains(self, user: str, peer: str) -> bool:
        entries = self._users.get(user_key(user))
        if not entries:
            return False
        entry = entries.get(self.digest(peer))
        return entry is not None and entry[0] + self.ttl > self._clock()

    def remember(self, user: str, peer: str) -> tuple[bytes, float] | None:
        """Mark ``peer`` seen now for ``user``; the (digest, time) to persist, or None when the
        stored row is recent enough."""
        digest, now = self.digest(peer), self._clock()
        entries = self._users.get(user_key(user))
        previous = entries.get(digest) if entries else None
        written = previous[1] if previous is not None else None
        if written is not None and now - written < TRUSTED_REFRESH_INTERVAL:
            self._put(user_key(user), digest, now, written)
            return None
        self._put(user_key(user), digest, now, now)
        return digest, now

    def _put(self, user: str, digest: bytes, seen: float, written: float) -> None:
        entries = self._users.setdefault(user, OrderedDict())
        entries[digest] = (seen, written)
        entries.move_to_end(digest)
        while len(entries) > self._max_per_user:
            entries.popitem(last=False)
