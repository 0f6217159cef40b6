"""The seams between mailgate's packages, named as :class:`typing.Protocol` classes.

Theory of operation
-------------------
Rules first:

1. A package hands another package only what a protocol below names. The front ends see an
   :class:`Accounts` (local logins) and an :class:`UpstreamConnector` (logged-in upstream
   connections); the upstream login sees a :class:`TokenSource`; the OAuth code and the admin
   plane see a :class:`CredentialStore`; the status page sees :class:`AccountView`\\ s.
2. The concrete objects are built once, by :func:`gateway.app.build_context`, and carried by
   the :class:`~gateway.context.GatewayContext`; nobody imports a concrete class across a seam
   to construct it, and nobody reads another package's private attributes.
3. Every protocol is satisfied structurally (no inheritance): the concrete classes are
   :class:`gateway.oauth.accounts.AccountManager` / ``Account``,
   :class:`gateway.upstream.connector.UpstreamConnector` and
   :class:`gateway.oauth.store.StateStore` (SQLite; a PostgreSQL store is a second
   implementation of :class:`CredentialStore`). Tests put fakes behind the same protocols, and
   ``mypy --strict`` checks that the concrete classes fit (``tests/unit/test_ports.py``).

This module only names types: it does no I/O and imports nothing at run time but ``typing``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from .config import Config, ProviderConfig, UserConfig
    from .frontends.pop3_listing import Listing
    from .oauth.store import AccountRecord, AccountStatus, SealedSecret
    from .upstream.client import UpstreamIMAP
    from .upstream.smtp import UpstreamSMTP
    from .upstream.smtp_connector import SmtpProblem

T = TypeVar("T")

__all__ = [
    "AccountView",
    "Accounts",
    "CredentialStore",
    "HeldLock",
    "KdfRunner",
    "LocalAccount",
    "SmtpConnector",
    "Pop3ListingStore",
    "Pop3StateStore",
    "TokenSource",
    "UpstreamConnector",
]


class TokenSource(Protocol):
    """An upstream identity and its OAuth 2.0 access tokens (what the upstream login needs)."""

    @property
    def name(self) -> str:
        """The ``[users.X]`` key (for logs, events and the per-account connection cap)."""
        ...

    @property
    def upstream_user(self) -> str:
        """The upstream mailbox: the ``user=`` of XOAUTH2 / OAUTHBEARER."""
        ...

    @property
    def provider(self) -> ProviderConfig: ...

    async def access_token(self, *, force_refresh: bool = False) -> str:
        """A valid access token; ``force_refresh`` after the upstream server rejected one.
        Raises ``ReauthorizationRequired``, ``TemporaryFailure`` or ``AuthenticationFailed``."""
        ...


class LocalAccount(TokenSource, Protocol):
    """What a successful local login yields: the token source plus the user's configuration."""

    @property
    def user(self) -> UserConfig: ...


class AccountView(Protocol):
    """A running account as the status page may see it: nothing secret."""

    @property
    def name(self) -> str: ...

    def token_valid_until(self) -> float | None:
        """Wall-clock expiry (``time.time()`` scale) of the cached access token, if any."""
        ...


class KdfRunner(Protocol):
    """The bounded pool that runs slow password derivations off the event loop."""

    async def run(self, fn: Callable[..., T], *args: object) -> T: ...


class Accounts(Protocol):
    """Local logins and the running accounts (the OAuth package's side of the seam)."""

    @property
    def kdf(self) -> KdfRunner: ...

    async def login(self, username: str, password: str, *, peer: str | None = None) -> LocalAccount:
        """Check a client's local password; raises ``AuthenticationFailed`` (always the same
        answer), ``ReauthorizationRequired`` or ``TemporaryFailure``."""
        ...

    def view(self, name: str) -> AccountView | None:
        """The running account of a configured user, if one was used since the start."""
        ...

    def account(self, name: str) -> LocalAccount:
        """The account of a configured user *without* a password check (SMTP relay mode;
        ``KeyError`` if there is none). Its tokens are available only where no local password
        seals them (a provider ``key_file``, app-only flows) or after its user logged in since
        the start; otherwise ``access_token`` raises ``AuthenticationFailed``."""
        ...

    def update_config(self, config: Config) -> None:
        """SIGHUP: new sessions see the new users and providers."""
        ...


class UpstreamConnector(Protocol):
    """Opens logged-in upstream IMAP connections, owns the per-account connection caps and the
    pool of idle logged-in connections (:mod:`gateway.upstream.pool`).

    The release path: the returned connection holds its account's slot (see
    :mod:`gateway.upstream.slots`) and gives it back when it is closed -- ``aclose()`` or
    ``logout()``, or closing the stream it hands to the IMAP relay with ``detach()`` -- or
    when it is given to :meth:`release`. Callers therefore close or release what :meth:`open`
    returned on every path, and nothing else.
    """

    async def open(
        self, account: TokenSource, *, accept: frozenset[str] = frozenset()
    ) -> UpstreamIMAP:
        """A logged-in connection: a pooled one of this account logged in with its current
        token (``accept``: the lasting extensions, e.g. ``CONDSTORE``, the caller does not
        mind), else a new login (one refresh-and-retry). Raises ``ReauthorizationRequired``,
        ``TemporaryFailure`` (``UpstreamError`` for the IMAP side) or ``AuthenticationFailed``."""
        ...

    async def release(self, conn: UpstreamIMAP, *, clean: bool) -> None:
        """The session is done with ``conn``: pool it when ``clean`` (nothing outstanding,
        nothing of the session's state left on it but a selected mailbox), else log it out.
        Bounded by ``limits.logout_timeout``; never raises."""
        ...

    async def maintain(self) -> None:
        """The pool's task, run by the server: closes idle and dead pooled connections; when
        cancelled (shutdown) logs every pooled connection out."""
        ...

    def update_config(self, config: Config) -> None:
        """SIGHUP: new limits; running sessions keep the slots they hold."""
        ...


class SmtpConnector(Protocol):
    """Opens logged-in upstream SMTP connections (sending) and keeps per-account sending state:
    the SMTP connection cap (apart from IMAP's), the hourly message count, the last explained
    provider answer. Same release rule as :class:`UpstreamConnector`: close what :meth:`open`
    returned, on every path."""

    @property
    def problems(self) -> dict[str, SmtpProblem]: ...

    async def open(self, account: TokenSource) -> UpstreamSMTP:
        """Connect and AUTH with the account's token (one refresh-and-retry). Raises
        ``ReauthorizationRequired``, ``TemporaryFailure`` (``SmtpTemporary``), ``SmtpRefused``
        or ``AuthenticationFailed``."""
        ...

    async def extensions(self, provider: ProviderConfig) -> dict[str, str] | None:
        """The EHLO extensions of the provider's SMTP server (cached), ``None`` if unknown."""
        ...

    def try_send(self, account: str) -> bool:
        """Count a message against ``limits.smtp_messages_per_user_per_hour``."""
        ...

    def note_problem(self, account: str, reply: str, key: str, advice: str) -> None: ...

    def update_config(self, config: Config) -> None: ...


class HeldLock(Protocol):
    """A cross-process lock the caller holds until :meth:`release` (blocking)."""

    def release(self) -> None: ...


class CredentialStore(Protocol):
    """Per-account credentials at rest: verifier, wrapped data key, sealed secrets, status.

    Methods block (file or network I/O); async callers run them in a worker thread. Every
    write is atomic. Failures raise :class:`gateway.oauth.store.StoreError`.
    """

    def change_stamp(self) -> Hashable:
        """A cheap value that changes whenever anyone writes the store (``OSError`` when it
        cannot be taken: callers then read the store directly)."""
        ...

    def account(self, name: str) -> AccountRecord | None: ...

    def account_names(self) -> list[str]: ...

    def secret(self, account: str, kind: str = ...) -> SealedSecret | None: ...

    def status(self, account: str) -> AccountStatus | None: ...

    def save_account(
        self, record: AccountRecord, secrets: dict[str, SealedSecret] | None = None
    ) -> None:
        """Create or replace an account; with ``secrets``, replace all its secrets at once."""
        ...

    def save_secret(self, account: str, kind: str, provider: str, sealed: bytes) -> None: ...

    def set_status(self, account: str, state: str, detail: str = "") -> None: ...

    def delete_account(self, name: str) -> None: ...

    def address_key(self) -> bytes:
        """The store's own random key for the digests of remembered client addresses."""
        ...

    def trusted_addresses(self) -> list[tuple[str, bytes, float]]:
        """Every remembered address: (account, digest, last seen as a Unix time)."""
        ...

    def remember_address(self, account: str, digest: bytes, last_seen: float,
                         *, forget_before: float) -> None: ...

    def adopt_address_key(self, key: bytes) -> None:
        """Use ``key`` for the address digests from now on (``migrate-store``: the digests
        copied from another store were made under it). Run with the gateways stopped."""
        ...

    def refresh_lock(self, account: str, timeout: float) -> HeldLock:
        """The account's token-refresh lock, exclusive across every process and instance using
        this store, released when its holder dies; waits up to ``timeout`` seconds, then
        raises ``StoreError``."""
        ...

    def maildrop_lock(self, account: str) -> HeldLock | None:
        """The account's POP3 maildrop lock (RFC 1939's exclusive access) across every process
        and instance, released when its holder dies; None when another session holds it."""
        ...

    def close(self) -> None:
        """Release connections and threads (a no-op for SQLite)."""
        ...

class Pop3StateStore(Protocol):
    """Each account's remembered POP3 state, as JSON text under a kind: ``"listing"`` (the
    listing of :mod:`gateway.frontends.pop3_listing`) and ``"sizes"`` (the exact-size cache of
    :mod:`gateway.frontends.pop3_mapping`). No secrets are involved.

    Methods block; async callers run them in a worker thread. Two implementations: one file
    per account and kind under ``state_dir/pop3/`` (``Pop3StateFiles``, without ``[store]
    url``) and a table of the PostgreSQL store (``PgStore``), so every instance serving an
    account sees the same state. ``pop3_state`` returns ``None`` when nothing is stored;
    ``save_pop3_state`` replaces atomically. Both raise ``OSError`` on failure.
    """

    def pop3_state(self, account: str, kind: str) -> str | None: ...

    def save_pop3_state(self, account: str, kind: str, text: str) -> None: ...


class Pop3ListingStore(Protocol):
    """Each account's remembered POP3 listing (:mod:`gateway.frontends.pop3_listing`).

    Methods block; async callers run them in a worker thread. Implemented on a
    :class:`Pop3StateStore` (``Listings``). ``load`` returns ``None`` for nothing usable
    (absent, unreadable or damaged); ``save`` replaces atomically and raises ``OSError`` on
    failure.
    """

    def load(self, account: str) -> Listing | None: ...

    def save(self, account: str, listing: Listing) -> None: ...
