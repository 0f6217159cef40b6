"""The token requests of each OAuth 2.0 grant mailgate uses, built from a ``ProviderConfig``.

One function per grant; each returns a :class:`~gateway.oauth.endpoint.TokenResponse` or raises
``OAuthErrorResponse`` / ``TemporaryFailure`` (see :mod:`gateway.oauth.endpoint`). Client
authentication is ``client_secret_post`` (client_id, plus client_secret when configured), which
Google, Microsoft and RFC 6749 §2.3.1 all accept.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .endpoint import TokenResponse, post_form, request_token
from .jwt import JWT_BEARER_GRANT, ServiceAccountKey, service_account_assertion
from ..presets import MICROSOFT_APP_ONLY_SCOPE

if TYPE_CHECKING:
    from ..config import ProviderConfig

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# The Microsoft kinds whose client-credentials grant needs the app-only ".default" scope.
_MICROSOFT_KINDS = ("microsoft365", "outlook")


def _client(provider: "ProviderConfig") -> dict[str, str]:
    form: dict[str, str] = {}
    if provider.client_id:
        form["client_id"] = provider.client_id
    if provider.client_secret is not None:
        form["client_secret"] = provider.client_secret.get_secret_value()
    return form


def scopes_for(provider: "ProviderConfig") -> list[str]:
    """The scopes to request: the configured ones, except that Microsoft's app-only access
    (client credentials) must ask for the resource's ``.default`` scope."""
    if (
        provider.flow == "client_credentials"
        and provider.kind in _MICROSOFT_KINDS
        and not any(s.endswith("/.default") for s in provider.scopes)
    ):
        return [MICROSOFT_APP_ONLY_SCOPE]
    return list(provider.scopes)


async def _token(provider: "ProviderConfig", form: dict[str, str], timeout: float) -> TokenResponse:
    return await request_token(provider.token_url, form, timeout=timeout, ca_file=provider.ca_file)


async def refresh(provider: "ProviderConfig", refresh_token: str, *, timeout: float) -> TokenResponse:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, **_client(provider)}
    return await _token(provider, form, timeout)


async def exchange_code(
    provider: "ProviderConfig", code: str, *, redirect_uri: str, verifier: str, timeout: float
) -> TokenResponse:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
        **_client(provider),
    }
    return await _token(provider, form, timeout)


async def client_credentials(provider: "ProviderConfig", *, timeout: float) -> TokenResponse:
    form = {"grant_type": "client_credentials", **_client(provider)}
    scopes = scopes_for(provider)
    if scopes:
        form["scope"] = " ".join(scopes)
    return await _token(provider, form, timeout)


def load_service_account(path: Path) -> ServiceAccountKey:
    """Blocking (reads a file): call it from a thread."""
    return ServiceAccountKey.from_file(path)


async def jwt_bearer(
    provider: "ProviderConfig", key: ServiceAccountKey, *, subject: str, timeout: float
) -> TokenResponse:
    assertion = service_account_assertion(
        key,
        subject=subject,
        scopes=scopes_for(provider),
        audience=provider.token_url,
        now=int(time.time()),
    )
    form = {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
    return await _token(provider, form, timeout)


async def start_device_authorization(provider: "ProviderConfig", *, timeout: float) -> dict[str, Any]:
    """RFC 8628 §3.1: the device_code, user_code, verification_uri, expires_in, interval."""
    assert provider.device_url, "the config requires device_url for flow 'device'"
    form = {**_client(provider), "scope": " ".join(scopes_for(provider))}
    form.pop("client_secret", None)
    return await post_form(provider.device_url, form, timeout=timeout, ca_file=provider.ca_file)


async def poll_device(provider: "ProviderConfig", device_code: str, *, timeout: float) -> TokenResponse:
    form = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code, **_client(provider)}
    return await _token(provider, form, timeout)
