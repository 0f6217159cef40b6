"""Authorizing an account: the one credential lifecycle behind ``mailgate authorize`` and the
admin page's ``/authorize/USER``.

Theory of operation
-------------------
:func:`authorize_account` runs the steps in this order, and both callers use it unchanged:

1. **Create or unlock the record.** No stored record: a new verifier and a new random data key,
   wrapped under the password or under the provider's daemon key file
   (:func:`gateway.oauth.credentials.new_record`). A stored record: the password must open it
   (:func:`~gateway.oauth.credentials.unlock`) -- otherwise :class:`WrongPassword` and nothing
   changes; a damaged record or the wrong key file raises ``SealError``.
2. **Re-wrap** the data key when the wanted wrapping (key file configured or not) differs from
   the stored one; the record takes the configured provider's name.
3. **Obtain** the grant (``obtain()``: the CLI's flows, or the code the browser brought back).
   It runs only after step 1, so a wrong password never costs a provider round trip.
4. **Seal** the refresh token under the data key (refresh flows; a missing one raises
   :class:`NoRefreshToken`), **save** the record and its secrets in one store transaction, and
   set the account's status to ``ok``.

The slow steps run in the given :class:`~gateway.ports.KdfRunner` (argon2, scrypt); store calls
in a worker thread. The password and the tokens are registered with
:func:`gateway.logs.register_secret`; none is ever logged or kept.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

from ..errors import MailgateError
from ..logs import register_secret
from . import credentials
from .accounts import REFRESH_FLOWS, STATUS_OK
from .endpoint import TokenResponse
from .grants import scopes_for
from .sealing import create_key_file, read_key_file, seal
from .send_scope import GRANTED_SCOPE
from .store import REFRESH_TOKEN, AccountRecord, SealedSecret

if TYPE_CHECKING:
    from ..config import ProviderConfig
    from ..ports import CredentialStore, KdfRunner

__all__ = [
    "NO_REFRESH_TOKEN",
    "NoRefreshToken",
    "WrongPassword",
    "authorize_account",
    "daemon_key",
]

NO_REFRESH_TOKEN = (
    "the identity provider issued no refresh token (for Google: authorize_params must keep "
    "access_type=offline)"
)


class WrongPassword(MailgateError):
    """The password does not open the stored record; nothing was changed."""


class NoRefreshToken(MailgateError):
    """A refresh flow's answer carried no refresh token; nothing was changed."""


async def daemon_key(provider: ProviderConfig) -> bytes | None:
    """The provider's daemon key (created on first use), or None without ``key_file``.
    Raises ``SealError`` or ``OSError``."""
    path = provider.key_file
    if path is None:
        return None
    if not path.exists():
        return await trio.to_thread.run_sync(create_key_file, path)
    return await trio.to_thread.run_sync(read_key_file, path)


async def authorize_account(
    store: CredentialStore,
    kdf: KdfRunner,
    *,
    name: str,
    provider: ProviderConfig,
    password: str,
    existing: AccountRecord | None,
    daemon_key: bytes | None,
    obtain: Callable[[], Awaitable[TokenResponse]],
) -> TokenResponse:
    """Steps 1-4 of the module docstring; returns the provider's answer (for its lifetime).
    ``existing`` is the account's stored record as read before asking for the password."""
    register_secret(password)
    record, data_key = await _record(kdf, name, provider, password, existing, daemon_key)
    answer = await obtain()
    register_secret(answer.access_token)
    register_secret(answer.refresh_token)
    secrets: dict[str, SealedSecret] = {}
    if provider.flow in REFRESH_FLOWS:
        if not answer.refresh_token:
            raise NoRefreshToken(NO_REFRESH_TOKEN)
        sealed = seal(data_key, answer.refresh_token.encode("utf-8"), account=name,
                      provider=provider.name, kind=REFRESH_TOKEN)
        secrets[REFRESH_TOKEN] = SealedSecret(provider.name, sealed, 0.0)
    # Not a secret: what the IdP granted, for "re-authorize to send" (gateway.oauth.send_scope).
    granted = answer.scope if answer.scope is not None else " ".join(scopes_for(provider))
    secrets[GRANTED_SCOPE] = SealedSecret(provider.name, granted.encode("utf-8"), 0.0)
    await trio.to_thread.run_sync(store.save_account, record, secrets)
    await trio.to_thread.run_sync(store.set_status, name, STATUS_OK, "")
    return answer


async def _record(
    kdf: KdfRunner, name: str, provider: ProviderConfig, password: str,
    existing: AccountRecord | None, daemon_key: bytes | None,
) -> tuple[AccountRecord, bytes]:
    if existing is None:
        return await kdf.run(_new, name, provider.name, password, daemon_key)
    data_key = await kdf.run(_unlock, existing, password, daemon_key)
    if data_key is None:
        raise WrongPassword(f"wrong local password for {name}")
    record = replace(existing, provider=provider.name)
    wanted = "keyfile" if daemon_key is not None else "password"
    if existing.key_wrapping != wanted:
        record = await kdf.run(_rewrap, record, data_key, password, daemon_key)
        record = replace(record, provider=provider.name)
    return record, data_key


def _new(
    name: str, provider: str, password: str, daemon_key: bytes | None
) -> tuple[AccountRecord, bytes]:
    return credentials.new_record(name, provider, password, daemon_key=daemon_key)


def _unlock(record: AccountRecord, password: str, daemon_key: bytes | None) -> bytes | None:
    return credentials.unlock(record, password, daemon_key=daemon_key)


def _rewrap(
    record: AccountRecord, data_key: bytes, password: str, daemon_key: bytes | None
) -> AccountRecord:
    return credentials.change_password(record, data_key, password, daemon_key=daemon_key)
