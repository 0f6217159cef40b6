"""The access-token cache of one account: cached, refreshed early, single-flight, backed off.

Theory of operation
-------------------
:class:`TokenCache` wraps a ``mint`` coroutine (a refresh-token grant, client credentials or a
signed JWT assertion; see :mod:`gateway.oauth.accounts`) and hands out its access token:

* A cached token is returned while more than ``margin`` seconds of its life remain; the margin
  is ``REFRESH_MARGIN`` but at most half the token's lifetime, so short-lived tokens are still
  reused.
* Single flight: one ``trio.Lock`` per account. When twenty logins arrive together, the first
  mints, the other nineteen wait on the lock and then find the fresh token: one token request.
  ``force_refresh=True`` (the upstream server rejected our token) mints a new token unless
  another task already replaced the one the caller saw while it waited.
* Back-off: after a ``TemporaryFailure`` (identity provider down, slow or failing), further
  calls fail at once with a ``TemporaryFailure`` until ``retry_after``; the delay doubles from
  ``BACKOFF_INITIAL`` up to ``BACKOFF_MAX`` and resets on success. A login storm against a
  dead identity provider therefore costs one request per back-off period, not one per login.

Time is trio's clock (monotonic; ``autojump_clock`` works in tests).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ..errors import TemporaryFailure
from .endpoint import TokenResponse

REFRESH_MARGIN = 300.0  # seconds before expiry at which a token is refreshed
DEFAULT_LIFETIME = 3600.0  # assumed when the identity provider omits expires_in
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0


@dataclass(frozen=True)
class CachedToken:
    value: str = field(repr=False)
    obtained_at: float
    expires_at: float

    def fresh(self, now: float) -> bool:
        lifetime = self.expires_at - self.obtained_at
        margin = min(REFRESH_MARGIN, lifetime / 2)
        return now < self.expires_at - margin


class TokenCache:
    def __init__(self, mint: Callable[[], Awaitable[TokenResponse]]):
        self._mint = mint
        self._lock = trio.Lock()
        self._token: CachedToken | None = None
        self._backoff = 0.0
        self._retry_after = float("-inf")
        self.mints = 0  # successful token requests, for metrics

    @property
    def token(self) -> CachedToken | None:
        return self._token

    def invalidate(self) -> None:
        self._token = None

    async def get(self, *, force_refresh: bool = False) -> str:
        seen = self._token
        if not force_refresh and seen is not None and seen.fresh(trio.current_time()):
            return seen.value
        async with self._lock:
            current = self._token
            now = trio.current_time()
            if current is not None and current.fresh(now):
                if not force_refresh or current is not seen:
                    return current.value
            if now < self._retry_after:
                raise TemporaryFailure(
                    f"identity provider failing; next attempt in {self._retry_after - now:.0f} s"
                )
            try:
                answer = await self._mint()
            except TemporaryFailure:
                self._backoff = min(BACKOFF_MAX, max(BACKOFF_INITIAL, self._backoff * 2))
                self._retry_after = trio.current_time() + self._backoff
                raise
            self._backoff = 0.0
            self._retry_after = float("-inf")
            self.mints += 1
            now = trio.current_time()
            lifetime = answer.expires_in if answer.expires_in else DEFAULT_LIFETIME
            self._token = CachedToken(answer.access_token, now, now + lifetime)
            return answer.access_token
