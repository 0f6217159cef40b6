"""Authorizing an account from the browser: ``/authorize/USER`` → provider → ``/oauth/callback``.

Theory of operation
-------------------
The same authorization-code + PKCE flow as ``mailgate authorize`` (the URL, the PKCE values and
the code exchange are :mod:`gateway.oauth.flows` / :mod:`gateway.oauth.grants`), with the admin
port itself as the redirect target. Three steps, each an HTTP request:

1. ``GET /authorize/USER`` — :meth:`WebAuthorizations.start` makes a :class:`PendingAuthorization`
   (random ``state``, PKCE verifier, the redirect URI as the browser addresses this server) and
   the route redirects the browser to the provider.
2. ``GET /oauth/callback?code=..&state=..`` — :meth:`WebAuthorizations.callback` finds the
   pending entry by ``state`` (an unknown or used state is refused: forged or replayed), and
   exchanges the code at once (codes are short-lived and single-use). The token answer stays in
   memory in the pending entry; the page asks the admin to *set* the user's local password
   (new account) or *confirm* it (existing account: the sealed data key must be unlocked).
3. ``POST /oauth/complete`` — the form carries the entry's random id and a CSRF token that must
   also match a ``SameSite=Strict`` cookie set with the form (double submit). Then the same
   credential lifecycle as the CLI (:func:`gateway.oauth.lifecycle.authorize_account`): a new
   credential record (or the existing one unlocked), the refresh token sealed under the
   account's data key, both committed in one store transaction, status ``ok``.

Pending entries expire after ``flows.AUTHORIZE_TIMEOUT`` and are bounded in number
(:data:`MAX_PENDING`); a wrong confirmation password may be retried :data:`MAX_PASSWORD_TRIES`
times. No token, code or password is ever rendered or logged; the refresh token is dropped
from memory as soon as it is sealed.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..defence import constant_time_equal
from ..errors import MailgateError, TemporaryFailure
from ..oauth import flows, grants, lifecycle
from ..oauth.accounts import REFRESH_FLOWS
from ..oauth.endpoint import OAuthErrorResponse, TokenResponse
from ..oauth.passwords import check_password_policy
from ..oauth.pkce import make_state, make_verifier
from ..oauth.sealing import SealError
from ..oauth.store import AccountRecord, StoreError

if TYPE_CHECKING:
    from ..config import Config, ProviderConfig
    from ..ports import CredentialStore, KdfRunner

log = logging.getLogger("mailgate.admin")

CALLBACK_PATH = "/oauth/callback"
MAX_PENDING = 32  # authorizations in progress at once
MAX_PASSWORD_TRIES = 5  # wrong confirmations before a pending authorization is discarded
PENDING_LIFETIME = flows.AUTHORIZE_TIMEOUT


class WebFlowError(MailgateError):
    """Shown to the admin as is (never contains a secret)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class PendingAuthorization:
    user: str
    provider: str
    state: str
    verifier: str = field(repr=False)
    redirect_uri: str
    created: float
    flow_id: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    answer: TokenResponse | None = field(default=None, repr=False)
    existing: AccountRecord | None = field(default=None, repr=False)
    tries: int = 0


class WebAuthorizations:
    def __init__(self) -> None:
        self._pending: dict[str, PendingAuthorization] = {}  # by state

    def __len__(self) -> int:
        return len(self._pending)

    def _expire(self) -> None:
        now = time.monotonic()
        for state, entry in list(self._pending.items()):
            if now - entry.created > PENDING_LIFETIME:
                del self._pending[state]

    def by_flow_id(self, flow_id: str) -> PendingAuthorization | None:
        self._expire()
        for entry in self._pending.values():
            if constant_time_equal(entry.flow_id, flow_id):
                return entry
        return None

    def discard(self, entry: PendingAuthorization) -> None:
        self._pending.pop(entry.state, None)

    # --- step 1 -----------------------------------------------------------------------------

    def start(self, config: "Config", name: str, *, base_url: str) -> str:
        """Register a pending authorization; return the provider URL to send the browser to."""
        user = config.users.get(name)
        if user is None:
            raise WebFlowError(f"there is no user {name!r} in the configuration", 404)
        provider = config.provider_for(user)
        if provider.flow != "authorization_code":
            raise WebFlowError(
                f"{name} uses the {provider.flow!r} flow, which has no browser step here: "
                f"run: mailgate authorize {name}"
            )
        self._expire()
        if len(self._pending) >= MAX_PENDING:
            raise WebFlowError("too many authorizations in progress; try again later", 503)
        entry = PendingAuthorization(
            user=name, provider=provider.name, state=make_state(), verifier=make_verifier(),
            redirect_uri=base_url + CALLBACK_PATH, created=time.monotonic(),
        )
        self._pending[entry.state] = entry
        log.info("web authorization of %s started", name)
        return flows.authorization_url(
            provider, redirect_uri=entry.redirect_uri, state=entry.state,
            verifier=entry.verifier, login_hint=user.upstream_user,
        )

    # --- step 2 -----------------------------------------------------------------------------

    async def callback(
        self, config: "Config", store: "CredentialStore", params: dict[str, str]
    ) -> PendingAuthorization:
        """Check the redirect, exchange the code; the entry then waits for the password form."""
        self._expire()
        entry = self._pending.get(params.get("state", ""))
        if entry is None or entry.answer is not None:
            raise WebFlowError(
                "this authorization is unknown, expired or already used; start again", 400
            )
        if "error" in params:
            self.discard(entry)
            error = params["error"][:100]
            log.info("web authorization of %s refused by the provider: %s", entry.user, error)
            raise WebFlowError(f"the identity provider refused the authorization ({error})")
        code = params.get("code", "")
        if not code:
            self.discard(entry)
            raise WebFlowError("the redirect carried no authorization code")
        provider = _provider(config, entry)
        try:
            entry.answer = await grants.exchange_code(
                provider, code, redirect_uri=entry.redirect_uri, verifier=entry.verifier,
                timeout=config.limits.token_request_timeout,
            )
        except OAuthErrorResponse as exc:
            self.discard(entry)
            raise WebFlowError(f"the identity provider refused the code: {exc}") from None
        except TemporaryFailure as exc:
            self.discard(entry)
            raise WebFlowError(f"the identity provider is unreachable: {exc}", 502) from None
        if provider.flow in REFRESH_FLOWS and not entry.answer.refresh_token:
            self.discard(entry)
            raise WebFlowError(lifecycle.NO_REFRESH_TOKEN)
        try:
            entry.existing = await trio.to_thread.run_sync(store.account, entry.user)
        except StoreError as exc:
            self.discard(entry)
            raise WebFlowError(f"the state store could not be read: {exc}", 500) from None
        return entry

    # --- step 3 -----------------------------------------------------------------------------

    async def complete(
        self, config: "Config", store: "CredentialStore", kdf: "KdfRunner",
        entry: PendingAuthorization, *, password: str, confirm: str,
    ) -> None:
        """Seal and store. Raises WebFlowError (the form is shown again unless discarded)."""
        answer = entry.answer
        assert answer is not None
        provider = _provider(config, entry)
        if entry.existing is None:
            if password != confirm:
                raise WebFlowError("the two passwords differ")
            try:
                check_password_policy(password)
            except ValueError as exc:
                raise WebFlowError(str(exc)) from None

        async def obtained() -> TokenResponse:
            return answer

        try:
            await lifecycle.authorize_account(
                store, kdf, name=entry.user, provider=provider, password=password,
                existing=entry.existing, daemon_key=await _daemon_key(provider), obtain=obtained,
            )
        except lifecycle.WrongPassword as exc:
            entry.tries += 1
            if entry.tries >= MAX_PASSWORD_TRIES:
                self.discard(entry)
                raise WebFlowError("too many wrong passwords; nothing was changed. Start again.")
            raise WebFlowError(f"{exc} (nothing was changed)") from None
        except (SealError, lifecycle.NoRefreshToken) as exc:
            self.discard(entry)
            raise WebFlowError(str(exc)) from None
        except StoreError as exc:
            raise WebFlowError(f"the state store could not be written: {exc}", 500) from None
        self.discard(entry)
        entry.answer = None
        log.info("web authorization of %s completed (%s)", entry.user, provider.name)


def _provider(config: "Config", entry: PendingAuthorization) -> "ProviderConfig":
    user = config.users.get(entry.user)
    if user is None or user.provider != entry.provider:
        raise WebFlowError(f"the configuration of {entry.user} changed meanwhile; start again")
    return config.provider_for(user)


async def _daemon_key(provider: "ProviderConfig") -> bytes | None:
    try:
        return await lifecycle.daemon_key(provider)
    except (SealError, OSError) as exc:
        raise WebFlowError(str(exc), 500) from None
