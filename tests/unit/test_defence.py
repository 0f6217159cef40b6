"""AuthThrottle (per-IP / per-user penalties) and UpstreamSlots (per-account upstream cap).

Time is trio's virtual clock (``autojump_clock``): no test here really waits.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gateway.defence import (
    MAX_PENALTY_DELAY,
    PENALTY_DECAY_INTERVAL,
    REFUSE_AFTER_FAILURES,
    AuthThrottle,
    Verdict,
    address_key,
    constant_time_equal,
)
from gateway.errors import TemporaryFailure
from gateway.upstream.slots import SLOT_WAIT_EXCEEDED, UpstreamSlots


class FakeClock:
    """A hand-driven clock for the synchronous throttle tests."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def throttle(clock: FakeClock) -> AuthThrottle:
    return AuthThrottle(base_delay=2.0, clock=clock)


# --- AuthThrottle -----------------------------------------------------------------------------


def test_no_penalty_for_a_fresh_client(throttle: AuthThrottle) -> None:
    verdict = throttle.check("192.0.2.1", "alice")
    assert verdict.delay == 0 and not verdict.refuse


def test_penalty_doubles_from_the_base_delay_and_is_capped(throttle: AuthThrottle) -> None:
    delays = []
    for _ in range(7):
        throttle.record_failure("192.0.2.1", "alice")
        delays.append(throttle.delay_for("192.0.2.1", "alice"))
    assert delays == [2.0, 4.0, 8.0, MAX_PENALTY_DELAY, MAX_PENALTY_DELAY, MAX_PENALTY_DELAY,
                      MAX_PENALTY_DELAY]


def test_per_ip_penalty_applies_to_every_user_name(throttle: AuthThrottle) -> None:
    # A guesser cycling through user names from one address is slowed down all the same.
    for n in range(3):
        throttle.record_failure("192.0.2.1", f"user{n}")
    assert throttle.delay_for("192.0.2.1", "never-tried") == 8.0
    assert throttle.delay_for("192.0.2.2", "never-tried") == 0


def test_per_user_penalty_applies_from_every_address(throttle: AuthThrottle) -> None:
    # A botnet spreading guesses for one user over many addresses is slowed down too.
    for n in range(3):
        throttle.record_failure(f"198.51.100.{n}", "alice")
    assert throttle.delay_for("203.0.113.9", "ALICE") == 8.0
    assert throttle.delay_for("203.0.113.9", "bob") == 0


def test_refused_without_checking_after_enough_failures(throttle: AuthThrottle) -> None:
    for _ in range(REFUSE_AFTER_FAILURES - 1):
        throttle.record_failure("192.0.2.1", "alice")
    assert not throttle.check("192.0.2.1", "alice").refuse
    throttle.record_failure("192.0.2.1", "alice")
    verdict = throttle.check("192.0.2.1", "alice")
    assert verdict.refuse and verdict.delay == MAX_PENALTY_DELAY
    assert throttle.refused == 1


def test_penalties_decay_one_failure_per_interval(throttle: AuthThrottle, clock: FakeClock) -> None:
    for _ in range(REFUSE_AFTER_FAILURES):
        throttle.record_failure("192.0.2.1", "alice")
    assert throttle.check("192.0.2.1", "alice").refuse
    clock.now += PENALTY_DECAY_INTERVAL * 0.5
    assert throttle.check("192.0.2.1", "alice").refuse  # a failure counts until forgiven whole
    clock.now += PENALTY_DECAY_INTERVAL * 0.5
    assert not throttle.check("192.0.2.1", "alice").refuse  # one forgiven: checked again
    clock.now += PENALTY_DECAY_INTERVAL * (REFUSE_AFTER_FAILURES - 3.5)
    assert throttle.delay_for("192.0.2.1", "alice") == 8.0  # 2.5 points count as 3
    clock.now += PENALTY_DECAY_INTERVAL * 2.5
    assert throttle.check("192.0.2.1", "alice").delay == 0
    assert throttle.tracked == (0, 0)  # fully decayed entries are dropped


def test_a_stale_password_device_is_forgiven(throttle: AuthThrottle, clock: FakeClock) -> None:
    # A scanner polling every 5 minutes with an outdated password never builds up a penalty.
    for _ in range(50):
        throttle.record_failure("192.0.2.50", "scanner")
        clock.now += 300
        assert throttle.delay_for("192.0.2.50", "scanner") == 0


def test_success_clears_both_entries(throttle: AuthThrottle) -> None:
    for _ in range(4):
        throttle.record_failure("192.0.2.1", "alice")
    throttle.record_success("192.0.2.1", "alice")
    assert throttle.check("192.0.2.1", "alice").delay == 0
    assert throttle.tracked == (0, 0)


def test_success_as_another_user_does_not_clear_the_user_penalty(clock: FakeClock) -> None:
    # A guesser owning one valid account cannot reset the penalty on the account it attacks
    # (its own address is forgiven; the user's allowance, here as small as the address's,
    # is not).
    throttle = AuthThrottle(base_delay=2.0, user_refuse_after=REFUSE_AFTER_FAILURES, clock=clock)
    for _ in range(REFUSE_AFTER_FAILURES):
        throttle.record_failure("192.0.2.1", "alice")
    throttle.record_success("192.0.2.1", "mallory")
    assert throttle.check("192.0.2.1", "alice").refuse


def test_memory_is_bounded_under_a_flood_of_names(clock: FakeClock) -> None:
    throttle = AuthThrottle(max_tracked=100, clock=clock)
    for n in range(10_000):
        throttle.record_failure(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", f"user{n}")
    assert throttle.tracked == (100, 100)
    # The most recent failures are the ones remembered.
    assert throttle.delay_for("10.0.39.15", "user9999") > 0


def test_ipv6_is_tracked_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert address_key("2001:db8:1:2::5") == address_key("2001:db8:1:2:ffff::1")
    assert address_key("2001:db8:1:2::5") != address_key("2001:db8:1:3::5")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("fe80::1%eth0") == "fe80::/64"


def test_constant_time_equal() -> None:
    assert constant_time_equal("secret", "secret")
    assert constant_time_equal(b"\x00\xff", b"\x00\xff")
    assert not constant_time_equal("secret", "secreT")
    assert not constant_time_equal("secret", "secret!")
    assert constant_time_equal("pässword", "pässword".encode())


async def test_throttle_works_on_the_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    throttle = AuthThrottle(base_delay=2.0, clock=trio.current_time)
    throttle.record_failure("192.0.2.1", "alice")
    start = trio.current_time()
    await trio.sleep(throttle.delay_for("192.0.2.1", "alice"))
    assert trio.current_time() - start == pytest.approx(2.0)
    await trio.sleep(PENALTY_DECAY_INTERVAL)
    assert throttle.delay_for("192.0.2.1", "alice") == 0


# --- UpstreamSlots ----------------------------------------------------------------------------


async def test_slots_are_granted_up_to_the_cap(autojump_clock: trio.testing.MockClock) -> None:
    slots = UpstreamSlots("alice", capacity=3, wait=30)
    held = [await slots.acquire() for _ in range(3)]
    assert slots.in_use == 3
    start = trio.current_time()
    with pytest.raises(TemporaryFailure, match="too many upstream connections"):
        await slots.acquire()
    assert trio.current_time() - start == pytest.approx(30)
    assert str(TemporaryFailure(SLOT_WAIT_EXCEEDED)) == SLOT_WAIT_EXCEEDED
    assert slots.refused == 1 and slots.waiting == 0
    for slot in held:
        slot.release()
    assert slots.in_use == 0


async def test_a_waiter_gets_the_slot_released_in_time(autojump_clock: trio.testing.MockClock) -> None:
    slots = UpstreamSlots("alice", capacity=1, wait=30)
    first = await slots.acquire()
    got: list[float] = []

    async def second() -> None:
        with await slots.acquire():
            got.append(trio.current_time())

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.sleep(10)
        assert slots.waiting == 1
        first.release()
    assert got and got[0] - start == pytest.approx(10)
    assert slots.in_use == 0


async def test_waiters_are_served_first_come_first_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slots = UpstreamSlots("alice", capacity=1, wait=100)
    holder = await slots.acquire()
    order: list[int] = []

    async def waiter(n: int) -> None:
        slot = await slots.acquire()
        order.append(n)
        await trio.sleep(1)
        slot.release()

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(waiter, n)
            await trio.sleep(0.1)
        holder.release()
    assert order == [0, 1, 2, 3, 4]


async def test_release_is_idempotent_and_cancelled_waiters_hold_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slots = UpstreamSlots("alice", capacity=1, wait=100)
    slot = await slots.acquire()
    slot.release()
    slot.release()
    assert slots.in_use == 0
    slot = await slots.acquire()
    with trio.move_on_after(5):
        await slots.acquire()  # a session cancelled while waiting (client went away)
    assert slots.waiting == 0 and slots.in_use == 1
    slot.release()
    assert slots.in_use == 0


async def test_zero_wait_fails_at_once_when_full(autojump_clock: trio.testing.MockClock) -> None:
    slots = UpstreamSlots("alice", capacity=1, wait=0)
    with await slots.acquire():
        start = trio.current_time()
        with pytest.raises(TemporaryFailure):
            await slots.acquire()
        assert trio.current_time() == start
    assert slots.in_use == 0


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        UpstreamSlots("alice", capacity=0, wait=1)


# --- AccountManager.login with the throttle (real state store, real argon2) ------------------

from gateway.errors import AuthenticationFailed  # noqa: E402
from gateway.oauth.accounts import AccountManager  # noqa: E402
from gateway.upstream.connector import UpstreamConnector  # noqa: E402
from tests.fixtures.oauth import PASSWORD, make_config, seed_account  # noqa: E402

REFUSE_AFTER = 3  # a small threshold keeps these tests to a few derivations


@pytest.fixture
async def manager(idp, tmp_path) -> AccountManager:  # type: ignore[no-untyped-def]
    config = make_config(idp, tmp_path)
    _, refresh_token = idp.issue_tokens("alice@example.com")
    await seed_account(config, refresh_token)
    manager = AccountManager(config)
    manager.throttle = AuthThrottle(base_delay=0, refuse_after=REFUSE_AFTER,
                                    user_refuse_after=REFUSE_AFTER)
    return manager


async def fails_like_a_wrong_password(manager: AccountManager, user: str, password: str,
                                      peer: str) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        await manager.login(user, password, peer=peer)
    assert str(info.value) == "authentication failed"


@pytest.mark.lab
async def test_a_throttled_attempt_is_refused_unchecked_and_looks_like_a_wrong_password(
    manager: AccountManager,
) -> None:
    for _ in range(REFUSE_AFTER):
        await fails_like_a_wrong_password(manager, "alice", "wrong password!", "192.0.2.1")
    runs = manager.kdf.runs
    # The right password is not even checked now (no derivation), and the answer is the same.
    await fails_like_a_wrong_password(manager, "alice", PASSWORD, "192.0.2.1")
    # Per user: the same from another address.
    await fails_like_a_wrong_password(manager, "alice", PASSWORD, "198.51.100.7")
    assert manager.kdf.runs == runs
    assert manager.throttle.refused == 2


@pytest.mark.lab
async def test_unknown_user_names_are_throttled_per_address(manager: AccountManager) -> None:
    for n in range(REFUSE_AFTER):
        await fails_like_a_wrong_password(manager, f"nobody{n}", "guess", "192.0.2.1")
    await fails_like_a_wrong_password(manager, "alice", PASSWORD, "192.0.2.1")
    # Another address is not penalised: the real user logs in there, which clears nothing
    # for the guessing address.
    assert (await manager.login("alice", PASSWORD, peer="198.51.100.7")).name == "alice"
    assert manager.throttle.check("192.0.2.1", "nobody-else").refuse


@pytest.mark.lab
async def test_a_remembered_address_is_never_locked_out(manager: AccountManager) -> None:
    await manager.login("alice", PASSWORD, peer="192.0.2.10")  # the user's phone, verified
    for _ in range(REFUSE_AFTER + 2):
        await fails_like_a_wrong_password(manager, "alice", "wrong password!", "192.0.2.66")
    runs = manager.kdf.runs
    start = trio.current_time()
    assert (await manager.login("alice", PASSWORD, peer="192.0.2.10")).name == "alice"
    assert trio.current_time() - start < 0.5  # not delayed by the other address's failures
    assert manager.kdf.runs == runs  # served by the credential cache
    # The guessing address gets no oracle from the cache: even the right password is refused,
    # unchecked, like a wrong one; so is a never-seen address while the user's allowance (here
    # as small as an address's) is used up.
    await fails_like_a_wrong_password(manager, "alice", PASSWORD, "192.0.2.66")
    await fails_like_a_wrong_password(manager, "alice", PASSWORD, "192.0.2.77")
    assert manager.kdf.runs == runs


@pytest.mark.lab
async def test_penalty_delay_is_served_before_the_check(manager: AccountManager) -> None:
    manager.throttle = AuthThrottle(base_delay=0.2, refuse_after=100)
    await fails_like_a_wrong_password(manager, "alice", "wrong password!", "192.0.2.1")
    assert manager.throttle.delay_for("192.0.2.1", "alice") == pytest.approx(0.2)
    start = trio.current_time()
    await fails_like_a_wrong_password(manager, "alice", "wrong password!", "192.0.2.1")
    assert trio.current_time() - start >= 0.2


@pytest.mark.lab
async def test_a_reload_keeps_penalties_and_slots(manager: AccountManager, idp, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for _ in range(REFUSE_AFTER):
        await fails_like_a_wrong_password(manager, "alice", "wrong password!", "192.0.2.1")
    connector = UpstreamConnector(manager.config)
    slots = connector.slots("alice")
    config = make_config(idp, tmp_path, limits={"auth_failure_delay": 1.5})
    manager.update_config(config)
    connector.update_config(config)
    assert manager.throttle.check("192.0.2.1", "alice").refuse  # a SIGHUP forgives nothing
    assert manager.throttle.base_delay == 1.5
    assert connector.slots("alice") is slots  # running sessions keep their cap


# --- The attacks of the security review, on the throttle itself -------------------------------

from gateway.defence import (  # noqa: E402
    MAX_TRUSTED_PER_USER,
    TRUSTED_REFRESH_INTERVAL,
    USER_ALLOWANCE_FACTOR,
    TrustedAddresses,
)


def test_a_burst_is_reserved_before_any_check(throttle: AuthThrottle) -> None:
    # 40 guesses arrive together: only the allowance is let through to a password check.
    attempts = [throttle.begin("192.0.2.1", "carol", known=True) for _ in range(40)]
    checked = [a for a in attempts if not a.refused]
    assert len(checked) == REFUSE_AFTER_FAILURES
    # ... each one later than the one before (the penalty counts the pending ones).
    delays = [a.verdict.delay for a in checked]
    assert delays == sorted(delays) and delays[0] == 0 and delays[-1] == MAX_PENALTY_DELAY
    for attempt in checked:
        attempt.failed()
        attempt.failed()  # settling twice counts once
    assert throttle.penalty("192.0.2.1", "carol", known=True) == REFUSE_AFTER_FAILURES


def test_a_released_attempt_counts_nothing(throttle: AuthThrottle) -> None:
    attempt = throttle.begin("192.0.2.1", "carol", known=True)
    assert throttle.penalty("192.0.2.1", "carol", known=True) == 1  # pending
    attempt.release()
    assert throttle.penalty("192.0.2.1", "carol", known=True) == 0
    assert throttle.tracked == (0, 0)


def test_a_remembered_address_ignores_the_users_penalty(throttle: AuthThrottle) -> None:
    user_allowance = REFUSE_AFTER_FAILURES * USER_ALLOWANCE_FACTOR
    for n in range(user_allowance):
        throttle.begin(f"198.51.100.{n}", "bob", known=True).failed()
    assert throttle.check("203.0.113.5", "bob", known=True).refuse  # a never-seen address
    verdict = throttle.check("192.0.2.10", "bob", known=True, trusted=True)
    assert verdict == Verdict(0.0, False)  # the phone: not refused, not delayed
    attempt = throttle.begin("192.0.2.10", "bob", known=True, trusted=True)
    attempt.succeeded()  # its success forgives its address, not the guessers'
    assert throttle.check("203.0.113.5", "bob", known=True).refuse


def test_one_or_two_guessing_addresses_never_lock_out_a_new_device(
    throttle: AuthThrottle, clock: FakeClock,
) -> None:
    # Two addresses guessing as fast as they are let through, for an hour: a new device of the
    # user is delayed (at most MAX_PENALTY_DELAY), never refused.
    for second in range(3600):
        for guesser in ("198.51.100.1", "198.51.100.2"):
            attempt = throttle.begin(guesser, "bob", known=True)
            if not attempt.refused:
                attempt.failed()
        if second % 60 == 30:
            verdict = throttle.check("203.0.113.5", "bob", known=True)
            assert not verdict.refuse and verdict.delay <= MAX_PENALTY_DELAY
        clock.now += 1


def test_refused_attempts_insert_nothing(throttle: AuthThrottle) -> None:
    for _ in range(REFUSE_AFTER_FAILURES):
        throttle.begin("192.0.2.1", "alice", known=True).failed()
    before = throttle.tracked
    for n in range(1000):
        assert throttle.begin("192.0.2.1", f"random{n}").refused
    assert throttle.tracked == before


def test_random_names_cannot_evict_a_users_penalty(clock: FakeClock) -> None:
    throttle = AuthThrottle(max_tracked=100, clock=clock)
    user_allowance = REFUSE_AFTER_FAILURES * USER_ALLOWANCE_FACTOR
    for n in range(user_allowance + 2):
        throttle.begin(f"198.51.100.{n}", "alice", known=True).failed()
    assert throttle.check("203.0.113.5", "alice", known=True).refuse
    # 10,000 failures with random names from as many addresses: the tables stay bounded and
    # alice's record stays.
    for n in range(10_000):
        throttle.begin(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", f"x{n}").failed()
    addresses, users = throttle.tracked
    assert addresses <= 100 and users <= 101
    assert throttle.check("203.0.113.5", "alice", known=True).refuse


def test_an_entry_in_flight_is_not_evicted(clock: FakeClock) -> None:
    throttle = AuthThrottle(max_tracked=10, clock=clock)
    attempt = throttle.begin("192.0.2.1", "x", known=False)
    for n in range(50):
        throttle.record_failure(f"10.0.0.{n}", f"y{n}")
    assert throttle.penalty("192.0.2.1", "z") == 1  # still pending
    attempt.failed()
    assert throttle.penalty("192.0.2.1", "z") == 1


def test_trusted_addresses_slide_and_expire(clock: FakeClock) -> None:
    trusted = TrustedAddresses(b"k" * 32, ttl=30 * 86400, clock=clock)
    assert not trusted.contains("bob", "192.0.2.10")
    write = trusted.remember("bob", "192.0.2.10")
    assert write is not None and write[1] == clock.now
    assert b"192.0.2.10" not in write[0] and len(write[0]) == 32  # an HMAC, not the address
    assert trusted.contains("BOB", "192.0.2.10") and not trusted.contains("alice", "192.0.2.10")
    clock.now += 3600
    assert trusted.remember("bob", "192.0.2.10") is None  # written an hour ago: enough
    clock.now += TRUSTED_REFRESH_INTERVAL
    assert trusted.remember("bob", "192.0.2.10") is not None  # the daily refresh
    clock.now += 29 * 86400
    assert trusted.contains("bob", "192.0.2.10")  # slid with the last login
    clock.now += 2 * 86400
    assert not trusted.contains("bob", "192.0.2.10")
    # IPv6: the /64 is the address.
    trusted.remember("bob", "2001:db8:1:2::5")
    assert trusted.contains("bob", "2001:db8:1:2:ffff::9")
    assert not trusted.contains("bob", "2001:db8:1:3::5")


def test_trusted_addresses_load_skips_expired_and_bounds_each_user(clock: FakeClock) -> None:
    trusted = TrustedAddresses(b"k" * 32, ttl=86400, clock=clock)
    fresh, stale = trusted.digest("192.0.2.1"), trusted.digest("192.0.2.2")
    trusted.load([("bob", fresh, clock.now - 10), ("bob", stale, clock.now - 90000)])
    assert trusted.contains("bob", "192.0.2.1") and not trusted.contains("bob", "192.0.2.2")
    for n in range(MAX_TRUSTED_PER_USER + 5):
        trusted.remember("carol", f"10.0.0.{n}")
    assert not trusted.contains("carol", "10.0.0.0")  # the oldest went first
    assert trusted.contains("carol", f"10.0.0.{MAX_TRUSTED_PER_USER + 4}")


# --- KdfPool: the priority lane and fair lanes ------------------------------------------------

from gateway.oauth.passwords import KdfBusy, KdfPool  # noqa: E402


async def test_kdf_priority_lane_goes_first_and_lanes_take_turns() -> None:
    pool = KdfPool(1, max_queued=100)
    order: list[str] = []
    release = trio.Event()

    def job(tag: str) -> None:
        order.append(tag)

    async def hold() -> None:
        await pool.run(lambda: trio.from_thread.run(release.wait))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        for n in range(5):
            nursery.start_soon(lambda n=n: pool.run(job, f"flood{n}", lane="198.51.100.1"))
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(lambda: pool.run(job, "newcomer", lane="203.0.113.5"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(lambda: pool.run(job, "phone"))
        await trio.testing.wait_all_tasks_blocked()
        assert pool.waiting == 7
        release.set()
    assert order[0] == "phone"  # the priority lane first
    assert order.index("newcomer") == 2  # then the lanes in turn: one flood job, the newcomer
    assert pool.runs == 8 and pool.waiting == 0


async def test_kdf_ordinary_lanes_are_bounded_and_refuse_fast() -> None:
    pool = KdfPool(1, max_queued=3)
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: pool.run(lambda: trio.from_thread.run(release.wait)))
        await trio.testing.wait_all_tasks_blocked()
        for n in range(3):
            nursery.start_soon(lambda n=n: pool.run(lambda: None, lane=f"10.0.0.{n}"))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(KdfBusy):
            await pool.run(lambda: None, lane="10.0.0.9")
        # The priority lane is never refused.
        nursery.start_soon(lambda: pool.run(lambda: None))
        await trio.testing.wait_all_tasks_blocked()
        assert pool.waiting == 4 and pool.refused == 1
        release.set()
    assert pool.waiting == 0 and pool.runs == 5


async def test_kdf_cancelled_waiters_hold_nothing() -> None:
    pool = KdfPool(1, max_queued=3)
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: pool.run(lambda: trio.from_thread.run(release.wait)))
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.05):
            await pool.run(lambda: None, lane="10.0.0.1")
        assert pool.waiting == 0
        release.set()
    assert await pool.run(lambda: 42, lane="10.0.0.1") == 42


# --- Admin Host parsing -----------------------------------------------------------------------

from gateway.admin.access import AdminAccess, host_of, parse_authority  # noqa: E402
from gateway.admin.wire import Request  # noqa: E402
from gateway.config import AdminSection  # noqa: E402


def test_host_is_parsed_as_an_authority() -> None:
    assert parse_authority("127.0.0.1:8025") == ("127.0.0.1", 8025)
    assert parse_authority("[::1]:8025") == ("::1", 8025)
    assert parse_authority("localhost") == ("localhost", None)
    for bad in ("127.0.0.1:38025@evil.example", "127.0.0.1@evil.example", "evil.example/x",
                "127.0.0.1:80:80", "127.0.0.1 evil", "[::1", "[zz::1]:80", "127.0.0.1:99999",
                "127.0.0.1:", "user:pw@127.0.0.1", ""):
        assert parse_authority(bad) is None, bad
        assert host_of(bad) == ""


@pytest.mark.parametrize("token", [None, "admin-token-for-tests-0123456789"])
def test_a_host_with_userinfo_is_refused_in_both_modes(token: str | None) -> None:
    access = AdminAccess(AdminSection(bind="127.0.0.1:8025", token=token))
    request = Request("GET", "/authorize/alice",
                      (("host", "127.0.0.1:38025@evil.example"),
                       ("authorization", f"Bearer {token}")), b"", "127.0.0.1")
    refused = access.check(request)
    assert refused is not None and refused.status == 400


# --- Remembered addresses through AccountManager and the state store ---------------------------

import sqlite3  # noqa: E402

from gateway.oauth.store import SCHEMA_VERSION, StateStore  # noqa: E402


@pytest.mark.lab
async def test_a_remembered_address_survives_a_restart(manager: AccountManager) -> None:
    await manager.login("alice", PASSWORD, peer="192.0.2.10")  # the phone
    store = manager.store
    rows = store.trusted_addresses()
    assert [(r[0], len(r[1])) for r in rows] == [("alice", 32)]
    assert b"192.0.2.10" not in rows[0][1]
    # A restart: a new manager on the same store, nothing in memory (no cache either).
    restarted = AccountManager(manager.config, store=store)
    restarted.throttle = AuthThrottle(base_delay=0.2, refuse_after=REFUSE_AFTER,
                                      user_refuse_after=REFUSE_AFTER)
    for n in range(REFUSE_AFTER + 2):
        await fails_like_a_wrong_password(restarted, "alice", "wrong password!", f"192.0.2.{66 + n}")
    await fails_like_a_wrong_password(restarted, "alice", PASSWORD, "192.0.2.99")  # never seen
    start = trio.current_time()
    assert (await restarted.login("alice", PASSWORD, peer="192.0.2.10")).name == "alice"
    assert trio.current_time() - start < 5  # one real derivation, no penalty delay
    # A failed login still writes nothing; a login from a remembered address writes nothing
    # either until a day has passed.
    stamp = store.change_stamp()
    await fails_like_a_wrong_password(restarted, "alice", "wrong password!", "192.0.2.10")
    assert (await restarted.login("alice", PASSWORD, peer="192.0.2.10")).name == "alice"
    assert store.change_stamp() == stamp


def test_a_version_1_store_is_migrated(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "mailgate.sqlite3")
    db.executescript(
        "CREATE TABLE accounts (name TEXT PRIMARY KEY, provider TEXT NOT NULL,"
        " password_hash TEXT NOT NULL, key_wrapping TEXT NOT NULL, kdf TEXT,"
        " wrapped_key BLOB NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);"
        "CREATE TABLE secrets (account TEXT, kind TEXT, provider TEXT, sealed BLOB,"
        " updated REAL, PRIMARY KEY (account, kind));"
        "CREATE TABLE status (account TEXT PRIMARY KEY, state TEXT, detail TEXT, updated REAL);"
        "INSERT INTO accounts VALUES ('bob', 'lab', 'x', 'password', NULL, x'00', 1, 1);"
        "PRAGMA user_version = 1;"
    )
    db.close()
    store = StateStore(state)
    assert store.account("bob") is not None  # kept
    key = store.address_key()
    assert len(key) == 32 and StateStore(state).address_key() == key  # stable
    store.remember_address("bob", b"d" * 32, 1000.0, forget_before=0)
    store.remember_address("bob", b"e" * 32, 5000.0, forget_before=2000.0)  # forgets "d"
    assert store.trusted_addresses() == [("bob", b"e" * 32, 5000.0)]
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
    store.delete_account("bob")
    assert store.trusted_addresses() == []


async def test_kdf_keeps_a_worker_for_the_priority_lane() -> None:
    pool = KdfPool(2, max_queued=10)
    release = trio.Event()
    started: list[str] = []

    def hold(tag: str) -> None:
        started.append(tag)
        trio.from_thread.run(release.wait)

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(lambda n=n: pool.run(hold, f"flood{n}", lane=f"10.0.0.{n}"))
        with trio.fail_after(5):
            while not started:
                await trio.sleep(0.01)
        await trio.sleep(0.2)
        assert len(started) == 1 and pool.waiting == 2  # the flood gets one worker of two
        nursery.start_soon(lambda: pool.run(lambda: started.append("phone")))
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            while "phone" not in started:  # the kept worker serves it at once
                await trio.sleep(0.01)
        release.set()
    assert sorted(started) == ["flood0", "flood1", "flood2", "phone"]


@pytest.mark.lab
async def test_a_device_opening_many_connections_at_once_is_one_attempt(
    manager: AccountManager,
) -> None:
    # A phone opening 20 connections with the right password, from a fresh address: one
    # derivation, one reserved attempt, 20 logins -- the allowance counts guesses, not copies.
    names: list[str] = []

    async def login() -> None:
        names.append((await manager.login("alice", PASSWORD, peer="192.0.2.44")).name)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(login)
    assert names == ["alice"] * 20 and manager.kdf.runs == 1
    assert manager.throttle.penalty("192.0.2.44", "alice", known=True) == 0
