"""The interactive authorization flows of ``mailgate authorize``.

Each flow returns the identity provider's first :class:`~gateway.oauth.endpoint.TokenResponse`
(whose refresh token the caller seals and stores) and talks to the admin only through ``show``
(a line of text to display) and ``read_line`` (a line typed or piped in):

* :func:`authorization_code_loopback` — authorization code + PKCE (S256), RFC 8252 loopback
  redirect received by :class:`~gateway.oauth.loopback.LoopbackReceiver`.
* :func:`authorization_code_manual` — the same for headless servers: the admin opens the URL on
  any machine and pastes back the address the browser was redirected to (it fails to load,
  which is expected) or just the code.
* :func:`device_code` — RFC 8628: shows the user code and URL, then polls every ``interval``
  seconds, +5 s on ``slow_down``, until approval, denial or expiry.
* :func:`app_token` — client credentials / service account: no interaction, one token to
  prove the configuration works.

Every wait has a deadline (``AUTHORIZE_TIMEOUT``, or the device code's ``expires_in``).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from ..errors import MailgateError, TemporaryFailure
from . import grants
from .endpoint import OAuthErrorResponse, TokenResponse
from .loopback import LoopbackReceiver
from .pkce import make_state, make_verifier, s256_challenge

if TYPE_CHECKING:
    from ..config import ProviderConfig

AUTHORIZE_TIMEOUT = 600.0  # seconds the admin has to approve in the browser
DEVICE_DEFAULT_INTERVAL = 5.0  # RFC 8628 §3.2
DEVICE_DEFAULT_LIFETIME = 900.0  # Microsoft's default when expires_in is missing
DEVICE_SLOW_DOWN_INCREMENT = 5.0  # RFC 8628 §3.5
MANUAL_REDIRECT_URI = "http://127.0.0.1/"

Show = Callable[[str], None]
ReadLine = Callable[[], Awaitable[str]]


class FlowError(MailgateError):
    """The authorization did not complete (denied, expired, forged redirect, bad paste)."""


def authorization_url(
    provider: "ProviderConfig", *, redirect_uri: str, state: str, verifier: str, login_hint: str
) -> str:
    assert provider.authorize_url, "the config requires authorize_url for this flow"
    params = {
        "response_type": "code",
        "client_id": provider.client_id or "",
        "redirect_uri": redirect_uri,
        "scope": " ".join(grants.scopes_for(provider)),
        "state": state,
        "code_challenge": s256_challenge(verifier),
        "code_challenge_method": "S256",
        "login_hint": login_hint,
        **provider.authorize_params,
    }
    separator = "&" if "?" in provider.authorize_url else "?"
    return provider.authorize_url + separator + urllib.parse.urlencode(
        params, quote_via=urllib.parse.quote
    )


def _code_from(params: dict[str, str]) -> str:
    if "error" in params:
        detail = params.get("error_description", "")
        raise FlowError(f"authorization refused: {params['error']} {detail}".strip())
    code = params.get("code", "")
    if not code:
        raise FlowError("the redirect carried no authorization code")
    return code


async def _exchange(
    provider: "ProviderConfig", code: str, redirect_uri: str, verifier: str, timeout: float
) -> TokenResponse:
    return await grants.exchange_code(
        provider, code, redirect_uri=redirect_uri, verifier=verifier, timeout=timeout
    )


async def authorization_code_loopback(
    provider: "ProviderConfig", *, login_hint: str, show: Show, timeout: float,
    wait_limit: float = AUTHORIZE_TIMEOUT,
) -> TokenResponse:
    verifier, state = make_verifier(), make_state()
    async with await LoopbackReceiver.open() as receiver:
        url = authorization_url(
            provider, redirect_uri=receiver.redirect_uri, state=state, verifier=verifier,
            login_hint=login_hint,
        )
        show("Open this URL in a browser on this machine and approve the access:")
        show(url)
        show(f"Waiting up to {wait_limit:.0f} s for the redirect to {receiver.redirect_uri} ...")
        with trio.move_on_after(wait_limit) as scope:
            params = await receiver.wait(state=state)
        if scope.cancelled_caught:
            raise FlowError("no authorization arrived in time; run the command again")
    return await _exchange(provider, _code_from(params), receiver.redirect_uri, verifier, timeout)


def parse_pasted(text: str, *, state: str) -> str:
    """The code from a pasted redirect URL (its ``state`` must match) or a bare code."""
    text = text.strip()
    if not text:
        raise FlowError("nothing was pasted")
    query = urllib.parse.urlsplit(text).query if "://" in text else text.lstrip("?")
    if "=" not in query:
        return text  # a bare code
    params = dict(urllib.parse.parse_qsl(query))
    if "state" in params and params["state"] != state:
        raise FlowError("the pasted address belongs to another authorization (state mismatch)")
    return _code_from(params)


async def authorization_code_manual(
    provider: "ProviderConfig", *, login_hint: str, show: Show, read_line: ReadLine,
    timeout: float, wait_limit: float = AUTHORIZE_TIMEOUT,
) -> TokenResponse:
    verifier, state = make_verifier(), make_state()
    url = authorization_url(
        provider, redirect_uri=MANUAL_REDIRECT_URI, state=state, verifier=verifier,
        login_hint=login_hint,
    )
    show("Open this URL in a browser (on any machine) and approve the access:")
    show(url)
    show("The browser then fails to load a page on 127.0.0.1: that is expected.")
    show("Paste the full address from its address bar here and press Enter:")
    with trio.move_on_after(wait_limit) as scope:
        pasted = await read_line()
    if scope.cancelled_caught:
        raise FlowError("nothing was pasted in time; run the command again")
    code = parse_pasted(pasted, state=state)
    return await _exchange(provider, code, MANUAL_REDIRECT_URI, verifier, timeout)


async def device_code(provider: "ProviderConfig", *, show: Show, timeout: float) -> TokenResponse:
    start = await grants.start_device_authorization(provider, timeout=timeout)
    device, user_code = start.get("device_code"), start.get("user_code")
    uri = start.get("verification_uri") or start.get("verification_url")
    if not (isinstance(device, str) and isinstance(user_code, str) and isinstance(uri, str)):
        raise TemporaryFailure("the device authorization answer lacks device_code/user_code/uri")
    interval = _number(start.get("interval"), DEVICE_DEFAULT_INTERVAL)
    lifetime = _number(start.get("expires_in"), DEVICE_DEFAULT_LIFETIME)
    show(f"On any device, open {uri} and enter the code {user_code}")
    if isinstance(start.get("message"), str):
        show(start["message"])
    with trio.move_on_after(lifetime) as scope:
        while True:
            await trio.sleep(interval)
            try:
                return await grants.poll_device(provider, device, timeout=timeout)
            except OAuthErrorResponse as exc:
                if exc.error == "authorization_pending":
                    continue
                if exc.error == "slow_down":
                    interval += DEVICE_SLOW_DOWN_INCREMENT
                    continue
                if exc.error == "expired_token":
                    raise FlowError("the code expired before it was entered; run again") from None
                if exc.error == "access_denied":
                    raise FlowError("the access was denied in the browser") from None
                raise
    assert scope.cancelled_caught
    raise FlowError("the code expired before it was entered; run the command again")


async def app_token(provider: "ProviderConfig", *, subject: str, timeout: float) -> TokenResponse:
    """Client credentials or a service-account assertion: one token, no interaction."""
    if provider.flow == "client_credentials":
        return await grants.client_credentials(provider, timeout=timeout)
    assert provider.service_account_key_file is not None
    key = await trio.to_thread.run_sync(
        grants.load_service_account, provider.service_account_key_file
    )
    return await grants.jwt_bearer(provider, key, subject=subject, timeout=timeout)


def _number(value: object, default: float) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return number if number > 0 else default
