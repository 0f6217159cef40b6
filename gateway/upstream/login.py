"""Logging in to the upstream IMAP account with an OAuth 2.0 access token.

Theory of operation
-------------------
:func:`open_upstream` is what the upstream connector (:mod:`gateway.upstream.connector`) calls
for the front ends after a local login succeeded:

1. take a connection slot from the account's ``slots`` (the per-account cap,
   :mod:`gateway.upstream.slots`), if given; it is released when the connection is closed;
2. :func:`gateway.upstream.client.connect`: TCP, verified TLS (implicit or STARTTLS), greeting,
   capabilities — within ``limits.upstream_connect_timeout``;
3. ``AUTHENTICATE XOAUTH2`` or ``OAUTHBEARER`` (the provider's ``sasl``), with SASL-IR when
   the server offers it;
4. if the server rejects the token (an OAuth error challenge, or a plain ``NO`` as Microsoft 365
   sends), ask the account for a fresh one (``access_token(force_refresh=True)``) and try once
   more on the same connection; a second rejection means the grant no longer works →
   :class:`~gateway.errors.ReauthorizationRequired`.

The outcome of an attempt is classified by :func:`classify_auth_failure`:

=======================================================  =====================================
server answer                                            result
=======================================================  =====================================
OAuth error challenge / ``NO`` (``AUTHENTICATIONFAILED``)  token rejected → refresh once
``NO [UNAVAILABLE]``, ``Suggested Backoff Time``,        ``TemporaryFailure`` (``UpstreamError``)
``Too many simultaneous connections``, ``[INUSE]``,
Gmail's ``exceeded command or bandwidth limits``
``BAD User is authenticated but not connected.``         ``ReauthorizationRequired`` (the token
(Microsoft: wrong mailbox or missing permission)         is fine, the mailbox grant is not)
any other ``BAD``                                        ``UpstreamError``
=======================================================  =====================================

Events (never with secrets): ``{"type": "upstream.connected", "user", "upstream", "latency_ms"}``
after a successful login and ``{"type": "upstream.error", "user", "upstream", "reason",
"detail"[, "feature"]}`` on a failure (:func:`gateway.events.upstream_error_event`), published
through ``publish`` when one is given. ``BAD User is authenticated but not connected`` raises
:class:`~gateway.errors.FeatureRefused` (``feature = "imap"``), a ``ReauthorizationRequired``.

Neither tokens nor SASL messages are ever logged.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any

import trio

from ..errors import FeatureRefused, MailgateError, ReauthorizationRequired, UpstreamError
from ..events import upstream_error_event
from ..protocol import sasl
from .client import UpstreamIMAP, UpstreamResponse, connect
from .slots import UpstreamSlots

if TYPE_CHECKING:
    from ..config import Limits, ProviderConfig
    from ..ports import TokenSource

log = logging.getLogger("mailgate.upstream")

__all__ = ["AuthVerdict", "classify_auth_failure", "open_upstream", "authenticate", "token_fingerprint"]

_TEMPORARY_CODES = frozenset({"UNAVAILABLE", "INUSE", "LIMIT", "SERVERBUG", "OVERQUOTA"})
_TEMPORARY_PHRASES = ("suggested backoff time", "too many simultaneous", "throttled", "try again later",
                      "bandwidth limits")
_NOT_CONNECTED = "authenticated but not connected"


class AuthVerdict(Enum):
    """What a failed AUTHENTICATE means for the caller."""

    TOKEN_REJECTED = "token_rejected"
    TEMPORARY = "temporary"
    MAILBOX_REFUSED = "mailbox_refused"
    PROTOCOL = "protocol"


def classify_auth_failure(response: UpstreamResponse, challenge: bytes | None) -> AuthVerdict:
    """Classify a failed AUTHENTICATE from the tagged answer and the error challenge (if any)."""
    text = response.text.lower()
    code = (response.code or "").split(" ", 1)[0].upper()
    if response.status == "BAD":
        if _NOT_CONNECTED in text:
            return AuthVerdict.MAILBOX_REFUSED
        if any(p in text for p in _TEMPORARY_PHRASES):
            return AuthVerdict.TEMPORARY
        return AuthVerdict.PROTOCOL
    if code in _TEMPORARY_CODES or any(p in text for p in _TEMPORARY_PHRASES):
        return AuthVerdict.TEMPORARY
    if challenge is not None:
        try:
            error = sasl.decode_oauth_error(challenge)
        except sasl.SASLError:
            return AuthVerdict.TOKEN_REJECTED
        if not error.token_rejected and error.status.startswith("5"):
            return AuthVerdict.TEMPORARY
    return AuthVerdict.TOKEN_REJECTED


def _initial_response(mechanism: str, user: str, token: str, host: str, port: int) -> bytes:
    if mechanism == "oauthbearer":
        return sasl.b64encode(sasl.oauthbearer_initial_response(user, token, host, port))
    return sasl.b64encode(sasl.xoauth2_initial_response(user, token))


async def authenticate(
    client: UpstreamIMAP, provider: ProviderConfig, upstream_user: str, token: str
) -> tuple[UpstreamResponse, bytes | None]:
    """One AUTHENTICATE attempt with ``token``; returns the tagged answer and any challenge."""
    mechanism = provider.sasl
    host, port = provider.imap_host, provider.imap_port
    try:
        initial = _initial_response(mechanism, upstream_user, token, host, port)
    except sasl.SASLError as exc:
        raise ReauthorizationRequired(upstream_user, f"cannot send this user or token upstream: {exc}") from None
    return await client.authenticate_oauth(mechanism, initial, error_reply=sasl.oauth_error_reply(mechanism))


Publish = Callable[[dict[str, Any]], Any]


def token_fingerprint(token: str) -> bytes:
    """What a pooled connection remembers of the access token it logged in with (a digest:
    the token itself is never kept with the connection)."""
    return hashlib.sha256(token.encode("utf-8")).digest()[:16]


async def open_upstream(
    account: TokenSource, limits: Limits, *, slots: UpstreamSlots | None = None,
    publish: Publish | None = None,
) -> UpstreamIMAP:
    """An authenticated upstream IMAP connection for ``account`` (see the module docstring).

    Raises :class:`~gateway.errors.ReauthorizationRequired`,
    :class:`~gateway.errors.TemporaryFailure` (:class:`~gateway.errors.UpstreamError` for the
    IMAP side) or, from ``account.access_token``, ``AuthenticationFailed``.
    """
    upstream = account.provider.imap
    started = trio.current_time()
    try:
        client = await _open(account, limits, slots)
    except MailgateError as exc:
        if publish is not None:
            publish(upstream_error_event(account.name, upstream, exc))
        raise
    if publish is not None:
        latency_ms = round((trio.current_time() - started) * 1000, 1)
        publish({"type": "upstream.connected", "user": account.name, "upstream": upstream, "latency_ms": latency_ms})
    return client


async def _open(
    account: TokenSource, limits: Limits, slots: UpstreamSlots | None
) -> UpstreamIMAP:
    provider = account.provider
    slot = await slots.acquire() if slots is not None else None
    try:
        client = await connect(
            provider.imap_host,
            provider.imap_port,
            tls=provider.imap_tls,
            ca_file=provider.ca_file,
            connect_timeout=limits.upstream_connect_timeout,
            command_timeout=limits.upstream_command_timeout,
            max_line=limits.max_line,
            proxy=provider.upstream_proxy,
        )
    except BaseException:
        if slot is not None:
            slot.release()
        raise
    client.slot = slot
    try:
        await _log_in(client, account)
    except BaseException:
        await client.aclose()
        raise
    return client


async def _log_in(client: UpstreamIMAP, account: TokenSource) -> None:
    provider = account.provider
    upstream_user = account.upstream_user
    for attempt in (1, 2):
        token = await account.access_token(force_refresh=attempt == 2)
        response, challenge = await authenticate(client, provider, upstream_user, token)
        if response.ok:
            client.credential = token_fingerprint(token)
            if not client.capabilities:
                await client.refresh_capabilities()
            log.info("%s: logged in upstream as %s (attempt %d)", client.where, upstream_user, attempt)
            return
        verdict = classify_auth_failure(response, challenge)
        shown = f"{response.status} {response.text}"
        log.info("%s: upstream login of %s refused (%s): %s", client.where, upstream_user, verdict.value, shown)
        if verdict is AuthVerdict.TEMPORARY:
            raise UpstreamError(f"{client.where} cannot log {upstream_user} in right now: {shown}")
        if verdict is AuthVerdict.MAILBOX_REFUSED:
            raise FeatureRefused(
                account.name,
                "imap",
                f"{client.where} accepted the token but not the mailbox {upstream_user!r} "
                f"(check upstream_user and the mailbox permissions): {shown}",
            )
        if verdict is AuthVerdict.PROTOCOL:
            raise UpstreamError(f"{client.where} did not accept AUTHENTICATE: {shown}")
    raise ReauthorizationRequired(account.name, f"{client.where} rejected a freshly refreshed token")
