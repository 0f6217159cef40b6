"""Accounts: the local login of a legacy client, and the upstream access token it leads to.

Theory of operation
-------------------
:class:`AccountManager` is built once per gateway from the config. The IMAP and POP3 front
ends call :meth:`AccountManager.login` on every client login and get an :class:`Account`, whose
:meth:`Account.access_token` the upstream login calls.

Login (``login(username, password)``):

1. The user name is a ``[users.X]`` key, or (case-insensitively) that user's ``upstream_user``.
2. The verified-credential cache is asked first (HMAC of user, password and stored verifier;
   see :mod:`gateway.oauth.passwords`): a hit costs microseconds and no derivation.
3. On a miss, argon2 verifies the password and, for password-sealed accounts, scrypt unwraps
   the data key, in a worker thread bounded by ``limits.kdf_concurrency``. Derivations of one
   account are serialised by a per-account lock and the cache is asked again inside it, so five
   connections opened at once by one phone cost one derivation, not five. The data key stays in
   memory in the :class:`Account` so that its tokens can be refreshed for the sessions.
4. Any failure (unknown user, no record, wrong password) spends the same derivation, waits
   ``limits.auth_failure_delay`` (outside the lock, so an attacker's failures do not queue a
   legitimate user's logins behind them) and raises the same ``AuthenticationFailed``. A failed
   login only reads the state store: it never changes a byte of it.

The account records read for logins are kept in memory, tagged with the store's change stamp
(:meth:`~gateway.oauth.store.StateStore.change_stamp`: one small read on the event loop): a
login re-reads the record in a worker thread only after the store was written (by anyone) or
the config reloaded, instead of a thread hop and an SQLite open on every login. A store that
cannot be stamped is read directly, as before (and its errors surface the same way).

Tokens (``access_token()``) come from a :class:`~gateway.oauth.tokens.TokenCache` whose mint
function depends on the provider's flow:

* ``authorization_code`` / ``device``: the refresh-token grant with the sealed refresh token
  (read from the store each time, so ``mailgate authorize`` takes effect without a restart).
  A rotated refresh token is sealed and committed to the store *before* the new access token is
  returned; if that write fails the new refresh token is kept in memory and the write retried
  on the next refresh, so the account is never lost.
* ``client_credentials``: the client-credentials grant (Microsoft app-only).
* ``service_account``: a JWT assertion signed with the service account's key, ``sub`` = user.

Every access and refresh token obtained or unsealed here, and every password verified by a
derivation, is registered with :func:`gateway.logs.register_secret` (a cached login registers
nothing: its password was registered when it was verified).

Identity-provider errors are classified: ``invalid_grant`` and other OAuth refusals raise
``ReauthorizationRequired`` (recorded in the store's status table for ``mailgate check``; the
dead grant is not retried until the stored token changes); HTTP 5xx, timeouts and connection
errors raise ``TemporaryFailure``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import trio

from ..defence import ALLOW, AuthThrottle
from ..errors import AuthenticationFailed, ReauthorizationRequired, TemporaryFailure
from ..logs import register_secret
from . import credentials, grants
from .endpoint import OAuthErrorResponse, TokenResponse
from .jwt import ServiceAccountKey
from .passwords import CredentialCache, KdfPool, burn_verification, verify_password
from .sealing import SealError, read_key_file, seal, unseal
from .store import REFRESH_TOKEN, AccountRecord, StoreError, open_store
from .tokens import TokenCache

if TYPE_CHECKING:
    from ..config import Config, Limits, ProviderConfig, UserConfig
    from ..events import EventBus
    from ..ports import CredentialStore

Publish = Callable[[dict[str, Any]], Any]

log = logging.getLogger("mailgate.oauth")
T = TypeVar("T")

REFRESH_FLOWS = ("authorization_code", "device")
# OAuth error codes that mean "try again later", not "the grant is gone".
TEMPORARY_OAUTH_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})
STATUS_OK = "ok"
STATUS_NEEDS_REAUTHORIZATION = "needs_reauthorization"
AUTH_FAILED_MESSAGE = "authentication failed"


class Account:
    """One ``[users.X]`` entry at run time: its upstream identity and its tokens (a
    :class:`gateway.ports.LocalAccount` and :class:`gateway.ports.AccountView`)."""

    def __init__(
        self, name: str, user: "UserConfig", provider: "ProviderConfig", *,
        store: "CredentialStore", limits: "Limits", publish: Publish | None = None,
    ):
        self.name = name
        self.user = user
        self.provider = provider
        self._store = store
        self._limits = limits
        self._data_key: bytes | None = None
        self._tokens = TokenCache(self._mint)
        self._service_account: ServiceAccountKey | None = None
        self._dead_grant: float | None = None  # `updated` of a stored token the IdP refused
        self._unsaved_refresh: tuple[float, str] | None = None  # (stored `updated`, new token)
        self._status_written: str | None = None
        self._record_updated: float | None = None  # `updated` of the account record last seen
        self._publish = publish
        self.login_lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<Account {self.name} provider={self.provider.name} flow={self.provider.flow}>"

    # --- public API -------------------------------------------------------------------------

    @property
    def upstream_user(self) -> str:
        return self.user.upstream_user

    @property
    def uses_refresh_token(self) -> bool:
        return self.provider.flow in REFRESH_FLOWS

    @property
    def unlocked(self) -> bool:
        return self._data_key is not None

    @property
    def token_mints(self) -> int:
        return self._tokens.mints

    def token_valid_until(self) -> float | None:
        """Wall-clock expiry of the cached access token, if there is one."""
        cached = self._tokens.token
        if cached is None:
            return None
        return time.time() + (cached.expires_at - trio.current_time())

    def note_record(self, updated: float) -> None:
        """The account record as a login read it: a rewritten record (``mailgate authorize``
        again: a new grant) drops the cached access token, so nothing logged in with a token
        of the old grant -- a pooled upstream connection -- is used any more."""
        if self._record_updated is not None and updated != self._record_updated:
            self._tokens.invalidate()
        self._record_updated = updated

    def unlock(self, data_key: bytes) -> None:
        if data_key != self._data_key:
            self._data_key = data_key

    async def check_usable(self) -> None:
        """Raise ReauthorizationRequired when the stored grant is known to be dead (and has not
        been replaced by ``mailgate authorize`` since)."""
        if self._dead_grant is None:
            return
        stored = await _in_thread(self._store.secret, self.name, REFRESH_TOKEN)
        if stored is not None and stored.updated != self._dead_grant:
            self._dead_grant = None
            return
        raise ReauthorizationRequired(self.name, "the identity provider refused its grant")

    async def access_token(self, *, force_refresh: bool = False) -> str:
        """A valid access token: cached, refreshed before expiry, one token request at a time.
        Raises ReauthorizationRequired / TemporaryFailure (/ AuthenticationFailed when a
        password-sealed account is used before its user logged in)."""
        return await self._tokens.get(force_refresh=force_refresh)

    # --- minting ----------------------------------------------------------------------------

    async def _mint(self) -> TokenResponse:
        timeout = self._limits.token_request_timeout
        try:
            if self.provider.flow == "client_credentials":
                answer = await grants.client_credentials(self.provider, timeout=timeout)
            elif self.provider.flow == "service_account":
                key = await self._service_account_key()
                answer = await grants.jwt_bearer(
                    self.provider, key, subject=self.user.upstream_user, timeout=timeout
                )
            else:
                answer = await self._refresh(timeout)
        except OAuthErrorResponse as exc:
            if exc.error in TEMPORARY_OAUTH_ERRORS:
                raise TemporaryFailure(f"identity provider: {exc}") from None
            log.warning("account %s: identity provider refused the grant: %s", self.name, exc)
            await self._record_status(STATUS_NEEDS_REAUTHORIZATION, exc.error)
            self._event("token.failed", reason="reauthorization_required")
            raise ReauthorizationRequired(self.name, exc.error) from None
        except ReauthorizationRequired:
            self._event("token.failed", reason="reauthorization_required")
            raise
        except TemporaryFailure as exc:
            log.warning("account %s: token request failed: %s", self.name, exc)
            self._event("token.failed", reason="temporary")
            raise
        except StoreError as exc:
            log.error("account %s: state store unavailable: %s", self.name, exc)
            self._event("token.failed", reason="temporary")
            raise TemporaryFailure("credential store unavailable") from None
        register_secret(answer.access_token)
        register_secret(answer.refresh_token)
        await self._record_status(STATUS_OK, "")
        self._event("token.refreshed")
        return answer

    def _event(self, kind: str, **fields: str) -> None:
        if self._publish is not None:
            self._publish({"type": kind, "user": self.name, "provider": self.provider.name,
                           **fields})

    def carry_over(self, previous: "Account") -> None:
        """After a config reload: keep the unlocked data key of the same user and provider."""
        if previous.provider.name == self.provider.name:
            self._data_key = previous._data_key

    async def _refresh(self, timeout: float) -> TokenResponse:
        stored = await _in_thread(self._store.secret, self.name, REFRESH_TOKEN)
        if stored is None:
            raise ReauthorizationRequired(self.name, "no refresh token stored")
        if stored.provider != self.provider.name:
            raise ReauthorizationRequired(
                self.name, f"authorized for provider {stored.provider!r}, configured for "
                f"{self.provider.name!r}"
            )
        if self._dead_grant == stored.updated:
            raise ReauthorizationRequired(self.name, "the identity provider refused its grant")
        data_key = await self._key()
        if self._unsaved_refresh is not None and self._unsaved_refresh[0] == stored.updated:
            refresh_token = self._unsaved_refresh[1]
        else:
            self._unsaved_refresh = None
            try:
                refresh_token = unseal(
                    data_key, stored.sealed, account=self.name,
                    provider=self.provider.name, kind=REFRESH_TOKEN,
                ).decode("utf-8")
            except SealError:
                self._data_key = None
                raise AuthenticationFailed("stored credentials changed; log in again") from None
            register_secret(refresh_token)
        try:
            answer = await grants.refresh(self.provider, refresh_token, timeout=timeout)
        except OAuthErrorResponse as exc:
            if exc.error not in TEMPORARY_OAUTH_ERRORS:
                self._dead_grant = stored.updated
            raise
        self._dead_grant = None
        if answer.refresh_token and answer.refresh_token != refresh_token:
            await self._save_rotated(answer.refresh_token, data_key, stored.updated)
        return answer

    async def _save_rotated(self, refresh_token: str, data_key: bytes, stored_at: float) -> None:
        sealed = seal(
            data_key, refresh_token.encode("utf-8"), account=self.name,
            provider=self.provider.name, kind=REFRESH_TOKEN,
        )
        try:
            await _in_thread(
                self._store.save_secret, self.name, REFRESH_TOKEN, self.provider.name, sealed
            )
        except StoreError as exc:
            log.error("account %s: rotated refresh token kept in memory only: %s", self.name, exc)
            self._unsaved_refresh = (stored_at, refresh_token)
        else:
            self._unsaved_refresh = None
            log.info("account %s: rotated refresh token saved", self.name)

    async def _key(self) -> bytes:
        if self._data_key is not None:
            return self._data_key
        record = await _in_thread(self._store.account, self.name)
        if record is None:
            raise ReauthorizationRequired(self.name, "no stored credentials")
        if record.key_wrapping != "keyfile" or self.provider.key_file is None:
            raise AuthenticationFailed(
                f"account {self.name!r} is sealed with its local password: its user must log in"
            )
        try:
            daemon_key = await _in_thread(read_key_file, self.provider.key_file)
            self._data_key = credentials.unwrap(record, daemon_key=daemon_key)
        except SealError as exc:
            raise ReauthorizationRequired(self.name, str(exc)) from None
        return self._data_key

    async def _service_account_key(self) -> ServiceAccountKey:
        if self._service_account is None:
            path = self.provider.service_account_key_file
            assert path is not None, "the config requires it for flow 'service_account'"
            try:
                self._service_account = await _in_thread(grants.load_service_account, path)
            except ValueError as exc:
                raise ReauthorizationRequired(self.name, str(exc)) from None
        return self._service_account

    async def _record_status(self, state: str, detail: str) -> None:
        if self._status_written == (state + detail):
            return
        try:
            await _in_thread(self._store.set_status, self.name, state, detail)
            self._status_written = state + detail
        except StoreError as exc:
            log.error("account %s: cannot record status: %s", self.name, exc)


class AccountManager:
    """Local logins and the :class:`Account` objects, one per configured user."""

    def __init__(
        self, config: "Config", *, store: "CredentialStore | None" = None,
        events: "EventBus | None" = None,
    ):
        self.config = config
        self.limits = config.limits
        self.store = store if store is not None else open_store(config)
        self.kdf = KdfPool(config.limits.kdf_concurrency)
        self.credentials = CredentialCache()
        # Per-IP / per-user penalties for failed logins (gateway.defence).
        self.throttle = AuthThrottle(base_delay=config.limits.auth_failure_delay)
        self.events = events
        self._accounts: dict[str, Account] = {}
        self._by_upstream = {u.upstream_user.casefold(): n for n, u in config.users.items()}
        # Account records as of the store's change stamp `_records_stamp` (see the docstring).
        self._records: dict[str, AccountRecord | None] = {}
        self._records_stamp: object = None

    def update_config(self, config: "Config") -> None:
        """SIGHUP: new sessions see the new users and providers. Sessions already running keep
        their Account objects; unchanged accounts keep their cached tokens."""
        old_accounts, self._accounts = self._accounts, {}
        for name, account in old_accounts.items():
            user = config.users.get(name)
            if user is None:
                continue
            if user == account.user and config.provider_for(user) == account.provider:
                self._accounts[name] = account
            else:
                self.account(name, config=config).carry_over(account)
        if config.limits.kdf_concurrency != self.limits.kdf_concurrency:
            self.kdf = KdfPool(config.limits.kdf_concurrency)
        self.config, self.limits = config, config.limits
        self.throttle.base_delay = config.limits.auth_failure_delay  # penalties are kept
        self._records, self._records_stamp = {}, None
        self._by_upstream = {u.upstream_user.casefold(): n for n, u in config.users.items()}

    def account(self, name: str, *, config: "Config | None" = None) -> Account:
        """The Account of a configured user (KeyError if there is none)."""
        account = self._accounts.get(name)
        if account is None:
            config = config or self.config
            user = config.users[name]
            account = Account(
                name, user, config.provider_for(user), store=self.store, limits=config.limits,
                publish=self._publish,
            )
            self._accounts[name] = account
        return account

    def view(self, name: str) -> Account | None:
        """The running Account of ``name`` if one was made (the status page; never creates)."""
        return self._accounts.get(name)

    def _publish(self, event: dict[str, Any]) -> None:
        if self.events is not None:
            self.events.publish(event)

    def resolve(self, username: str) -> str | None:
        """The ``[users.X]`` key a client's login name refers to, if any."""
        if username in self.config.users:
            return username
        return self._by_upstream.get(username.casefold())

    async def login(self, username: str, password: str, *, peer: str | None = None) -> Account:
        """Check a client's local password. ``peer`` (the client's IP address) enables the
        per-IP / per-user penalties of :class:`~gateway.defence.AuthThrottle`: a penalised
        attempt waits first, and a heavily penalised one is refused unchecked -- answered
        exactly like a wrong password. A password verified recently (the credential cache)
        passes at once, so a guesser on the same network cannot lock out working devices."""
        name = self.resolve(username)
        who = (peer, name or username) if peer is not None else None
        verdict = self.throttle.check(*who) if who is not None else ALLOW
        if verdict is not ALLOW and not await self._recently_verified(name, password):
            await trio.sleep(verdict.delay)
            if verdict.refuse:
                await self._fail(name or username, "throttled after repeated failures", who)
        if name is None:
            await self.kdf.run(burn_verification, password)
            await self._fail(username, "unknown user", who)
        account = self.account(name)
        record = await self._record(name)
        failure = None
        if record is None:
            await self.kdf.run(burn_verification, password)
            failure = f"not authorized yet (run: mailgate authorize {name})"
        elif not self._cached(account, record, password):
            # One derivation at a time per account: concurrent logins with the same password
            # wait for the first and then hit the cache.
            async with account.login_lock:
                if not self._cached(account, record, password):
                    failure = await self._verify(account, record, password)
        if failure is not None:  # the failure delay is served outside the lock
            await self._fail(name, failure, who)
        if who is not None:
            self.throttle.record_success(*who)
        assert record is not None
        account.note_record(record.updated)
        if record.provider != account.provider.name:
            raise ReauthorizationRequired(
                name, f"authorized for provider {record.provider!r}, now {account.provider.name!r}"
            )
        await account.check_usable()
        return account

    async def _recently_verified(self, name: str | None, password: str) -> bool:
        if name is None:
            return False
        record = await self._record(name)
        return record is not None and self._cached(self.account(name), record, password)

    def _cached(self, account: Account, record: AccountRecord, password: str) -> bool:
        return self.credentials.check(account.name, password, record.password_hash) and (
            account.unlocked or record.key_wrapping == "keyfile"
        )

    async def _verify(self, account: Account, record: AccountRecord, password: str) -> str | None:
        """Run the derivation; None on success, else why the login fails (for the log)."""
        try:
            data_key = await self.kdf.run(_unlock, record, password)
        except SealError as exc:
            log.error("account %s: %s", account.name, exc)
            return "stored credentials do not open"
        if data_key is None:
            return "wrong password"
        if data_key:
            account.unlock(data_key)
        register_secret(password)  # a verified password never reaches a log line
        self.credentials.remember(account.name, password, record.password_hash)
        return None

    async def _record(self, name: str) -> AccountRecord | None:
        """The stored record of ``name``: from memory unless the store changed since."""
        try:
            stamp: object = self.store.change_stamp()
        except OSError:
            stamp = None  # unreadable or gone: read it the slow way, whose errors say why
        if stamp is not None and stamp == self._records_stamp and name in self._records:
            return self._records[name]
        try:
            record = await _in_thread(self.store.account, name)
        except StoreError as exc:
            log.error("state store unavailable: %s", exc)
            raise TemporaryFailure("credential store unavailable") from None
        if stamp is not None:
            # Stamped *before* the read: a write in between changes the stamp again, so a
            # record is never kept under a stamp older than what it saw.
            if stamp != self._records_stamp:
                self._records, self._records_stamp = {}, stamp
            self._records[name] = record
        return record

    async def _fail(self, name: str, reason: str, who: tuple[str, str] | None = None) -> NoReturn:
        if who is not None:
            self.throttle.record_failure(*who)
        log.info("login failed for %r: %s", name, reason)
        await trio.sleep(self.limits.auth_failure_delay)
        raise AuthenticationFailed(AUTH_FAILED_MESSAGE)


def _unlock(record: AccountRecord, password: str) -> bytes | None:
    """Verify and, for password-sealed records, unwrap. b"" = right password, key-file record
    (its data key is loaded from the key file when first needed)."""
    if record.key_wrapping == "keyfile":
        return b"" if verify_password(record.password_hash, password) else None
    return credentials.unlock(record, password)


async def _in_thread(fn: Callable[..., T], *args: object) -> T:
    """Blocking store and file calls run in a worker thread, off the event loop."""
    return await trio.to_thread.run_sync(fn, *args)
