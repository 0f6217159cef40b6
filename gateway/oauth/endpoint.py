"""HTTP calls to an identity provider's token and device endpoints.

Theory of operation
-------------------
Every call is one ``application/x-www-form-urlencoded`` POST answered by JSON (RFC 6749 §5),
made with a fresh ``httpx.AsyncClient`` (token calls are rare; nothing to keep alive) under a
hard trio deadline, so a hanging identity provider costs at most ``timeout`` seconds.

Answers are classified for the callers:

* 2xx with JSON → the decoded object (:func:`request_token` also checks it is a token answer);
* 4xx with an OAuth ``error`` → :class:`OAuthErrorResponse` (``invalid_grant``,
  ``authorization_pending``, ...): the caller decides what it means for its flow;
* 5xx, 429, a non-JSON answer, a timeout or any connection error → ``TemporaryFailure``.

Outbound proxy: ``proxy`` (the provider's ``https_proxy``, by default ``[network]
https_proxy``) sends every request through that HTTP proxy (a ``CONNECT`` tunnel for https);
``trust_env`` lets httpx honour ``HTTPS_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY`` (and
``SSL_CERT_FILE``) from the environment, which is ignored otherwise. An explicit ``proxy`` wins
over the environment. A proxy that refuses the tunnel or wants credentials is a
``TemporaryFailure`` naming the proxy (never its password) and its answer.

Secrets (codes, tokens, client secrets, proxy passwords) are sent but never logged or put into
an exception message; an error description from the identity provider is kept, shortened.
"""

from __future__ import annotations

import functools
import json
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from ..errors import TemporaryFailure

log = logging.getLogger("mailgate.oauth")

MAX_RESPONSE_BYTES = 1024 * 1024  # a token answer is a few KiB
MAX_DESCRIPTION_CHARS = 200
USER_AGENT = "mailgate"


class OAuthErrorResponse(Exception):
    """The identity provider refused the request with an OAuth error code (RFC 6749 §5.2)."""

    def __init__(self, error: str, description: str = "", status: int = 400):
        self.error = error
        self.description = description[:MAX_DESCRIPTION_CHARS]
        self.status = status
        text = f"{error} (HTTP {status})"
        if self.description:
            text += f": {self.description}"
        super().__init__(text)


@dataclass(frozen=True)
class TokenResponse:
    access_token: str = field(repr=False)
    expires_in: float | None = None
    refresh_token: str | None = field(default=None, repr=False)
    scope: str | None = None
    token_type: str = "Bearer"


@functools.lru_cache(maxsize=16)
def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


def _host(url: str) -> str:
    try:
        return httpx.URL(url).host or url
    except (httpx.InvalidURL, TypeError):
        return "?"


def _proxy_where(proxy: str) -> str:
    """``host:port`` of a proxy URL: what messages may show (never its credentials)."""
    try:
        parsed = httpx.URL(proxy)
        return f"{parsed.host}:{parsed.port}" if parsed.port else parsed.host or "?"
    except (httpx.InvalidURL, TypeError):
        return "?"


def _proxy_refusal(exc: httpx.ProxyError, proxy: str | None, host: str) -> TemporaryFailure:
    where = _proxy_where(proxy) if proxy else "the proxy from the environment"
    answer = str(exc)[:MAX_DESCRIPTION_CHARS]
    if answer.startswith(("407", "401")):  # tinyproxy answers wrong credentials with 401
        return TemporaryFailure(
            f"proxy {where} wants credentials to reach identity provider {host} ({answer}): "
            "put them in the proxy URL (http://user:password@proxy:port)"
        )
    return TemporaryFailure(
        f"proxy {where} refused the tunnel to identity provider {host} ({answer or 'no answer'})"
    )


async def post_form(
    url: str, form: dict[str, str], *, timeout: float, ca_file: Path | None = None,
    proxy: str | None = None, trust_env: bool = False,
) -> dict[str, Any]:
    """POST ``form`` to ``url`` and return the decoded JSON object of a 2xx answer."""
    host = _host(url)
    try:
        with trio.fail_after(timeout):
            async with httpx.AsyncClient(
                verify=_ssl_context(str(ca_file) if ca_file else None),
                timeout=timeout,
                proxy=proxy,
                trust_env=trust_env,
                follow_redirects=False,
                headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            ) as client:
                response = await client.post(url, data=form)
    except trio.TooSlowError:
        raise TemporaryFailure(
            f"identity provider {host} did not answer within {timeout:g} s"
        ) from None
    except httpx.ProxyError as exc:
        raise _proxy_refusal(exc, proxy, host) from None
    except httpx.HTTPError as exc:
        via = f" through proxy {_proxy_where(proxy)}" if proxy else ""
        raise TemporaryFailure(
            f"identity provider {host} unreachable{via} ({type(exc).__name__})"
        ) from None
    return _decode(response, host, proxy)


def _decode(response: httpx.Response, host: str, proxy: str | None = None) -> dict[str, Any]:
    status = response.status_code
    if status == 407:  # only a proxy answers this (plain-http forwarding; https is a CONNECT)
        where = _proxy_where(proxy) if proxy else "a proxy"
        raise TemporaryFailure(
            f"proxy {where} wants credentials to reach identity provider {host} (407): "
            "put them in the proxy URL (http://user:password@proxy:port)"
        )
    if status >= 500 or status == 429:
        raise TemporaryFailure(f"identity provider {host} answered HTTP {status}")
    body: Any = None
    if len(response.content) <= MAX_RESPONSE_BYTES:
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
    if not isinstance(body, dict):
        if proxy:
            raise TemporaryFailure(
                f"identity provider {host} through proxy {_proxy_where(proxy)}: HTTP {status} "
                "without an OAuth answer (did the proxy refuse the request?)"
            )
        raise TemporaryFailure(f"identity provider {host} sent a malformed answer (HTTP {status})")
    if 200 <= status < 300 and "error" not in body:
        return body
    error = body.get("error")
    if not isinstance(error, str) or not error:
        raise TemporaryFailure(f"identity provider {host} answered HTTP {status} without an error")
    description = body.get("error_description")
    raise OAuthErrorResponse(error, description if isinstance(description, str) else "", status)


async def request_token(
    url: str, form: dict[str, str], *, timeout: float, ca_file: Path | None = None,
    proxy: str | None = None, trust_env: bool = False,
) -> TokenResponse:
    """POST a grant to a token endpoint and return the token answer."""
    body = await post_form(
        url, form, timeout=timeout, ca_file=ca_file, proxy=proxy, trust_env=trust_env
    )
    access_token = body.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise TemporaryFailure(f"identity provider {_host(url)} answered without an access token")
    expires_in = body.get("expires_in")
    try:
        lifetime = float(expires_in) if expires_in is not None else None
    except (TypeError, ValueError):
        lifetime = None
    refresh_token = body.get("refresh_token")
    scope = body.get("scope")
    log.debug("token endpoint %s issued a token (expires_in=%s, rotated=%s)",
              _host(url), lifetime, bool(refresh_token))
    return TokenResponse(
        access_token=access_token,
        expires_in=lifetime,
        refresh_token=refresh_token if isinstance(refresh_token, str) and refresh_token else None,
        scope=scope if isinstance(scope, str) else None,
        token_type=str(body.get("token_type") or "Bearer"),
    )
