"""Accounts: the local login of a legacy client, and the upstream access token it leads to.

Theory of operation
-------------------
:class:`AccountManager` is built once per gateway from the config. The IMAP and POP3 front
ends call :meth:`AccountManager.login` on every client login and get an :class:`Account`, whose
:meth:`Account.access_token` the upstream login calls.

Login (``login(username, password, peer=...)``):

1. The user name is a ``[users.X]`` key, or (case-insensitively) that user's ``upstream_user``.
2. The throttle (:mod:`gateway.defence`) judges the attempt by its address's failures and --
   unless the address is remembered for the user -- the user's. One beyond its allowance is
   refused unchecked, before anything else is asked (the cache included), exactly like a
   wrong password. Remembered addresses are loaded from the state store on the first login
   and written back (rarely: when new, then once a day) after a correct password.
3. Logins with one credential (user, password) are serialised by a lock keyed by its cache
   key; inside it the verified-credential cache is asked (HMAC of user, password and stored
   verifier; see :mod:`gateway.oauth.passwords`): a hit costs microseconds and no derivation,
   so five connections opened at once by one phone cost one derivation and count as one
   attempt, while a guesser's other passwords never wait behind the user's.
4. On a miss the password check is *reserved* with the throttle (it counts as a pending
   failure until settled, so simultaneous guesses are counted like sequential ones; a
   penalised one waits its delay), then argon2 verifies the password and, for
   password-sealed accounts, scrypt unwraps the data key, in a worker thread of the
   :class:`~gateway.oauth.passwords.KdfPool`: a remembered address in its priority lane, any
   other in its address's lane (a full queue gives a fast temporary refusal). The data key
   stays in memory in the :class:`Account` so that its tokens can be refreshed.
5. Any failure (unknown user, no record, wrong password) spends the same derivation, waits
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
  The refresh runs under the store's per-account refresh lock, across processes and instances,
  and the access token it obtains is sealed into the store: the next holder uses that token
  instead of refreshing again (:mod:`gateway.oauth.shared_token`), so a rotating refresh token
  is never used twice.
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
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import trio

from ..defence import ALLOW, Attempt, AuthThrottle, TrustedAddresses, address_key
from ..errors import AuthenticationFailed, ReauthorizationRequired, TemporaryFailure
from ..logs import register_secret
from . import credentials, grants, shared_token
from .endpoint import OAuthErrorResponse, TokenResponse
from .jwt import ServiceAccountKey
from .passwords import CredentialCache, KdfBusy, KdfPool, burn_verification, verify_password
from .sealing import SealError, read_key_file, seal, unseal
from .shared_token import ACCESS_TOKEN
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
#: Seconds a refresh waits for another process's refresh of the same account, beyond one
#: token request (``limits.token_request_timeout``).
REFRESH_LOCK_SLACK = 5.0
STATUS_OK = "ok"
STATUS_NEEDS_REAUTHORIZATION = "needs_reauthorization"
AUTH_FAILED_MESSAGE = "authentication failed"
DAY = 86400.0


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
        self._rejected: str | None = None  # the access token the upstream server last refused
        self._record_updated: float | None = None  # `updated` of the account record last seen
        self._publish = publish

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
        if force_refresh and self._tokens.token is not None:
            self._rejected = self._tokens.token.value
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
                answer = await self._refresh_once(timeout)
        except OAuthErrorResponse as exc:
            if exc.error in TEMPORARY_OAUTH_ERRORS:
                raise TemporaryFailure(f"identity provider: {exc}") from None
            log.warning("account %s: identity provider refused the grant: %s", self.name, exc)
            await self._record_status(STATUS_NEEDS_REAUTHORIZATION, exc.error)
            self._event("token.failed", reason="reauthorization_required", detail=exc.error)
            raise ReauthorizationRequired(self.name, exc.error) from None
        except ReauthorizationRequired as exc:
            self._event("token.failed", reason="reauthorization_required", detail=str(exc))
            raise
        except TemporaryFailure as exc:
            log.warning("account %s: token request failed: %s", self.name, exc)
            self._event("token.failed", reason="temporary", detail=str(exc))
            raise
        except StoreError as exc:
            log.error("account %s: state store unavailable: %s", self.name, exc)
            self._event("token.failed", reason="temporary", detail="credential store unavailable")
            raise TemporaryFailure("credential store unavailable") from None
        register_secret(answer.access_token)
        register_secret(answer.refresh_token)
        await self._record_status(STATUS_OK, "")
        valid_until = time.time() + answer.expires_in if answer.expires_in else None
        self._event("token.refreshed", valid_until=valid_until)
        return answer

    def _event(self, kind: str, **fields: object) -> None:
        if self._publish is not None:
            self._publish({"type": kind, "user": self.name, "provider": self.provider.name,
                           **fields})

    def carry_over(self, previous: "Account") -> None:
        """After a config reload: keep the unlocked data key of the same user and provider."""
        if previous.provider.name == self.provider.name:
            self._data_key = previous._data_key

    async def _refresh_once(self, timeout: float) -> TokenResponse:
        """A refresh under the store's per-account lock, across processes and instances; a
        token another holder just obtained is used instead (:mod:`.shared_token`)."""
        held = await _in_thread(self._store.refresh_lock, self.name, timeout + REFRESH_LOCK_SLACK)
        try:
            stored = await _in_thread(self._store.secret, self.name, ACCESS_TOKEN)
            if stored is not None and stored.provider == self.provider.name:
                shared = shared_token.open_fresh(
                    await self._key(), stored.sealed, account=self.name,
                    provider=self.provider, rejected=self._rejected)
                if shared is not None:
                    return shared
            answer = await self._refresh(timeout)
            sealed = shared_token.seal_answer(await self._key(), answer, account=self.name,
                                              provider=self.provider)
            try:
                await _in_thread(self._store.save_secret, self.name, ACCESS_TOKEN,
                                 self.provider.name, sealed)
            except StoreError as exc:
                log.warning("account %s: access token not shared: %s", self.name, exc)
            return answer
        finally:
            with trio.CancelScope(shield=True):
                await _in_thread(held.release)

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
        self.kdf = KdfPool(config.limits.kdf_concurrency,
                           max_queued=config.limits.kdf_queue_length)
        self.credentials = CredentialCache()
        # Per-IP / per-user penalties for failed logins, and the addresses remembered per
        # user (gateway.defence; loaded from the store on the first login).
        self.throttle = AuthThrottle(base_delay=config.limits.auth_failure_delay)
        self._trusted: TrustedAddresses | None = None
        self._trusted_loading = trio.Lock()
        self._login_locks: dict[bytes, tuple[trio.Lock, int]] = {}
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
        if (config.limits.kdf_concurrency, config.limits.kdf_queue_length) != (
                self.limits.kdf_concurrency, self.limits.kdf_queue_length):
            self.kdf = KdfPool(config.limits.kdf_concurrency,
                               max_queued=config.limits.kdf_queue_length)
        if self._trusted is not None:
            self._trusted.ttl = config.limits.trusted_address_days * DAY
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
        defence of :mod:`gateway.defence`: an attempt beyond its allowance is refused
        unchecked -- answered exactly like a wrong password -- and every password check is
        reserved with the throttle before it runs (a penalised one waits first). An address
        remembered for the user (it logged in correctly before) is judged by its own failures
        only, and its derivations take the KDF's priority lane."""
        name = self.resolve(username)
        trusted = peer is not None and name is not None and await self._trusts(name, peer)
        held: list[Attempt] = []
        try:
            account = await self._check_password(name, username, password, peer, trusted, held)
        except KdfBusy:
            log.warning("login for %r refused: too many logins waiting for a password check",
                        name or username)
            raise TemporaryFailure("too many logins at once; try again later") from None
        finally:
            for attempt in held:
                attempt.release()  # not settled: no check happened (cancelled, busy)
        if peer is not None:
            await self._remember_address(account.name, peer)
        record = await self._record(account.name)
        assert record is not None
        account.note_record(record.updated)
        if record.provider != account.provider.name:
            raise ReauthorizationRequired(
                account.name,
                f"authorized for provider {record.provider!r}, now {account.provider.name!r}",
            )
        await account.check_usable()
        return account

    async def _check_password(
        self, name: str | None, username: str, password: str, peer: str | None,
        trusted: bool, held: list[Attempt],
    ) -> Account:
        """The password check proper; every reserved attempt is appended to ``held`` and
        settled here (failed or succeeded) when a check ran."""
        who = name or username
        lane = None if trusted or peer is None else address_key(peer)
        if peer is not None:
            verdict = self.throttle.check(peer, who, known=name is not None, trusted=trusted)
            if verdict.refuse:
                # Refused before anything is looked at, the credential cache included: a
                # penalised address gets no cheap test of the right password either.
                await trio.sleep(verdict.delay)
                await self._fail(who, "throttled after repeated failures", None)
        if name is None:
            attempt = await self._reserve(peer, who, False, trusted, held)
            if attempt is None or not attempt.refused:
                await self.kdf.run(burn_verification, password, lane=lane)
            await self._fail(who, "unknown user", attempt)
        account = self.account(name)
        record = await self._record(name)
        if record is None:
            attempt = await self._reserve(peer, name, True, trusted, held)
            if attempt is None or not attempt.refused:
                await self.kdf.run(burn_verification, password, lane=lane)
            await self._fail(name, f"not authorized yet (run: mailgate authorize {name})",
                             attempt)
        failure, attempt = None, None
        # One derivation at a time per credential: concurrent logins with the same password
        # (a phone opening five connections) wait for the first and then hit the cache, and
        # count as one attempt; other passwords (a guesser's) never queue behind it.
        async with self._login_lock(account.name, password, record.password_hash):
            if not self._cached(account, record, password):
                attempt = await self._reserve(peer, name, True, trusted, held)
                if attempt is not None and attempt.refused:
                    failure = "throttled after repeated failures"
                else:
                    failure = await self._verify(account, record, password, lane)
        if failure is not None:  # the failure delay is served outside the lock
            await self._fail(name, failure, attempt)
        if attempt is not None:
            attempt.succeeded()
        elif peer is not None:
            self.throttle.forgive_address(peer)  # a cache hit proves the password as well
        return account

    async def _reserve(self, peer: str | None, who: str, known: bool, trusted: bool,
                       held: list[Attempt]) -> Attempt | None:
        """Reserve a password check with the throttle and serve its penalty delay."""
        if peer is None:
            return None
        attempt = self.throttle.begin(peer, who, known=known, trusted=trusted)
        held.append(attempt)
        await trio.sleep(attempt.verdict.delay)
        return attempt

    def _login_lock(self, name: str, password: str, verifier: str) -> "_KeyedLock":
        return _KeyedLock(self._login_locks, self.credentials.key_of(name, password, verifier))

    async def _trusts(self, name: str, peer: str) -> bool:
        trusted = await self._trusted_addresses()
        return trusted is not None and trusted.contains(name, peer)

    async def _trusted_addresses(self) -> TrustedAddresses | None:
        """The remembered addresses, loaded from the store on first use (None while the store
        cannot be read: nothing is remembered then, and the next login tries again)."""
        if self._trusted is None:
            async with self._trusted_loading:
                if self._trusted is None:
                    try:
                        key = await _in_thread(self.store.address_key)
                        rows = await _in_thread(self.store.trusted_addresses)
                    except StoreError as exc:
                        log.error("remembered addresses unavailable: %s", exc)
                        return None
                    trusted = TrustedAddresses(key, ttl=self.limits.trusted_address_days * DAY)
                    trusted.load(rows)
                    self._trusted = trusted
        return self._trusted

    async def _remember_address(self, name: str, peer: str) -> None:
        """After a correct password: remember ``peer`` for ``name`` (in the store when new or
        not written for a day). A store error is logged; the login still succeeds."""
        trusted = await self._trusted_addresses()
        if trusted is None:
            return
        write = trusted.remember(name, peer)
        if write is None:
            return
        digest, seen = write
        try:
            await _in_thread(partial(self.store.remember_address, forget_before=seen - trusted.ttl),
                             name, digest, seen)
        except StoreError as exc:
            log.error("account %s: cannot remember the login address: %s", name, exc)

    def _cached(self, account: Account, record: AccountRecord, password: str) -> bool:
        return self.credentials.check(account.name, password, record.password_hash) and (
            account.unlocked or record.key_wrapping == "keyfile"
        )

    async def _verify(self, account: Account, record: AccountRecord, password: str,
                      lane: str | None) -> str | None:
        """Run the derivation; None on success, else why the login fails (for the log)."""
        try:
            data_key = await self.kdf.run(_unlock, record, password, lane=lane)
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

    async def _fail(self, name: str, reason: str, attempt: Attempt | None) -> NoReturn:
        if attempt is not None:
            attempt.failed()
        log.info("login failed for %r: %s", name, reason)
        await trio.sleep(self.limits.auth_failure_delay)
        raise AuthenticationFailed(AUTH_FAILED_MESSAGE)


def _unlock(record: AccountRecord, password: str) -> bytes | None:
    """Verify and, for password-sealed records, unwrap. b"" = right password, key-file record
    (its data key is loaded from the key file when first needed)."""
    if record.key_wrapping == "keyfile":
        return b"" if verify_password(record.password_hash, password) else None
    return credentials.unlock(record, password)


class _KeyedLock:
    """``async with``: one holder per key at a time; the table keeps only keys in use."""

    def __init__(self, locks: dict[bytes, tuple[trio.Lock, int]], key: bytes):
        self._locks, self._key = locks, key

    async def __aenter__(self) -> None:
        lock, users = self._locks.get(self._key, (None, 0))
        if lock is None:
            lock = trio.Lock()
        self._locks[self._key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._leave(lock)
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        lock = self._locks[self._key][0]
        lock.release()
        self._leave(lock)

    def _leave(self, lock: trio.Lock) -> None:
        users = self._locks[self._key][1] - 1
        if users:
            self._locks[self._key] = (lock, users)
        else:
            del self._locks[self._key]


async def _in_thread(fn: Callable[..., T], *args: object) -> T:
    """Blocking store and file calls run in a worker thread, off the event loop."""
    return await trio.to_thread.run_sync(fn, *args)
