"""The access token an account's last refresh obtained, sealed in the store for the others.

Theory of operation
-------------------
Several processes (``[server] workers``) or instances (a shared PostgreSQL store) serve one
account, each with its own in-memory token cache. With rotating refresh tokens (Microsoft 365)
a refresh token used twice is an ``invalid_grant`` and a broken account, so a refresh runs
under the store's per-account refresh lock (:meth:`gateway.ports.CredentialStore.refresh_lock`).
Whoever gets the lock next must not refresh again: it reads the access token the previous
holder obtained. Rules:

1. After every refresh-token grant, the holder seals the new access token with its lifetime
   (``obtained``/``expires`` on the wall clock) under the account's data key, AAD kind
   ``access_token``, and saves it as the account's secret of that kind -- never in clear.
2. After taking the lock, a process first opens that secret: a token still fresh by the token
   cache's own rule (more than ``min(REFRESH_MARGIN, lifetime / 2)`` left) is used as if it had
   been minted, with its remaining lifetime -- unless it is the very token the upstream server
   just rejected (``rejected``).
3. The token is used only by a configuration that would have asked for the same grant: the
   sealed payload names the provider's token endpoint, client and scopes (:func:`grant_of`);
   after a reload that changes them, the next process refreshes.
4. Anything unreadable (another data key after a re-authorization, a damaged record) is simply
   not used: the process refreshes, as it would without this secret.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING

from .endpoint import TokenResponse
from .sealing import SealError, seal, unseal
from .tokens import DEFAULT_LIFETIME, REFRESH_MARGIN

if TYPE_CHECKING:
    from ..config import ProviderConfig

__all__ = ["ACCESS_TOKEN", "grant_of", "open_fresh", "seal_answer"]

ACCESS_TOKEN = "access_token"


def grant_of(provider: ProviderConfig) -> str:
    """Rule 3: what identifies the grant a token was asked for."""
    what = json.dumps([provider.token_url, provider.client_id, sorted(provider.scopes)])
    return hashlib.sha256(what.encode("utf-8")).hexdigest()[:32]


def seal_answer(data_key: bytes, answer: TokenResponse, *, account: str,
                provider: ProviderConfig) -> bytes:
    """Rule 1: the answer's access token and lifetime, sealed."""
    now = time.time()
    lifetime = answer.expires_in if answer.expires_in else DEFAULT_LIFETIME
    payload = json.dumps({"token": answer.access_token, "obtained": now,
                          "expires": now + lifetime, "grant": grant_of(provider)})
    return seal(data_key, payload.encode("utf-8"), account=account, provider=provider.name,
                kind=ACCESS_TOKEN)


def open_fresh(data_key: bytes, sealed: bytes, *, account: str, provider: ProviderConfig,
               rejected: str | None) -> TokenResponse | None:
    """Rules 2 to 4: the stored access token as an answer, or None."""
    try:
        payload = json.loads(unseal(data_key, sealed, account=account, provider=provider.name,
                                    kind=ACCESS_TOKEN))
        token, obtained, expires = payload["token"], payload["obtained"], payload["expires"]
        grant = payload["grant"]
    except (SealError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(token, str) or token == rejected or grant != grant_of(provider):
        return None
    now = time.time()
    margin = min(REFRESH_MARGIN, (expires - obtained) / 2)
    if now >= expires - margin:
        return None
    return TokenResponse(access_token=token, expires_in=expires - now)
