"""TokenCache timing rules (refresh margin, back-off) on trio's virtual clock.

The mint function here is a plain coroutine standing in for a token endpoint; the end-to-end
behaviour against a real identity provider is in test_oauth_accounts.py.
"""

from __future__ import annotations

import pytest
import trio

from gateway.errors import TemporaryFailure
from gateway.oauth.endpoint import TokenResponse
from gateway.oauth.tokens import BACKOFF_INITIAL, BACKOFF_MAX, REFRESH_MARGIN, TokenCache


class Issuer:
    def __init__(self, lifetime: float | None = 3600) -> None:
        self.lifetime = lifetime
        self.calls = 0
        self.failing = False

    async def __call__(self) -> TokenResponse:
        self.calls += 1
        await trio.sleep(0.01)
        if self.failing:
            raise TemporaryFailure("identity provider down")
        return TokenResponse(access_token=f"token-{self.calls}", expires_in=self.lifetime)


async def test_refreshed_a_margin_before_expiry(autojump_clock):
    issuer = Issuer(lifetime=3600)
    cache = TokenCache(issuer)
    assert await cache.get() == "token-1"
    await trio.sleep(3600 - REFRESH_MARGIN - 1)
    assert await cache.get() == "token-1"
    await trio.sleep(2)
    assert await cache.get() == "token-2"


async def test_short_lived_tokens_are_reused_for_half_their_life(autojump_clock):
    cache = TokenCache(Issuer(lifetime=60))
    assert await cache.get() == "token-1"
    await trio.sleep(29)
    assert await cache.get() == "token-1"
    await trio.sleep(2)
    assert await cache.get() == "token-2"


async def test_concurrent_callers_share_one_mint_and_force_refresh_once(autojump_clock):
    issuer = Issuer()
    cache = TokenCache(issuer)
    got: list[str] = []
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(lambda: _append(got, cache.get()))
    assert set(got) == {"token-1"} and issuer.calls == 1
    got.clear()
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(lambda: _append(got, cache.get(force_refresh=True)))
    assert set(got) == {"token-2"} and issuer.calls == 2


async def _append(out: list[str], value) -> None:
    out.append(await value)


async def test_backoff_doubles_and_resets(autojump_clock):
    issuer = Issuer()
    issuer.failing = True
    cache = TokenCache(issuer)
    attempts: list[float] = []
    while len(attempts) < 9:  # a client retrying every half second against a dead IdP
        calls = issuer.calls
        with pytest.raises(TemporaryFailure):
            await cache.get()
        if issuer.calls > calls:
            attempts.append(trio.current_time())
        await trio.sleep(0.5)
    gaps = [round(b - a) for a, b in zip(attempts, attempts[1:])]
    assert gaps == [1, 2, 4, 8, 16, 32, 60, 60], gaps
    assert BACKOFF_INITIAL == 1 and BACKOFF_MAX == 60
    await trio.sleep(BACKOFF_MAX)
    issuer.failing = False
    assert (await cache.get()).startswith("token-")
    issuer.failing = True
    cache.invalidate()
    with pytest.raises(TemporaryFailure):
        await cache.get()
    await trio.sleep(BACKOFF_INITIAL + 0.1)  # back to the initial delay after a success
    issuer.failing = False
    assert (await cache.get()).startswith("token-")


async def test_missing_expires_in_assumes_an_hour(autojump_clock):
    cache = TokenCache(Issuer(lifetime=None))
    await cache.get()
    assert cache.token.expires_at - cache.token.obtained_at == 3600
