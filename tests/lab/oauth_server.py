"""A real, small OAuth 2.0 authorization server for tests, on 127.0.0.1.

Theory of operation
-------------------
:class:`LabOAuthServer` is a stdlib ``ThreadingHTTPServer`` running in a background thread.
It is deliberately *not* a trio server: a test may block its own trio loop in a synchronous
client call (``trio.to_thread`` aside), and Dovecot's oauth2 passdb must still get its
introspection answers meanwhile. Every request is handled on its own thread; all mutable state
lives in one :class:`_State` guarded by a single ``threading.Lock``, so tests can poke at the
server (revoke, expire, approve a device code, switch a failure mode) while requests are in
flight.

It speaks just enough of the real protocols for mailgate and Dovecot:

* ``GET /authorize`` (RFC 6749 §4.1 + RFC 7636 PKCE): auto-approves and redirects with a
  single-use code bound to client, redirect URI, scope and the S256 challenge.
* ``POST /token``: ``authorization_code`` (checks the PKCE verifier), ``refresh_token``
  (optional rotation), ``client_credentials``, JWT bearer (RFC 7523, RS256 verified with
  ``cryptography`` against a registered issuer key) and the device grant (RFC 8628).
* ``POST /device``: RFC 8628 device authorization; ``GET /verify`` is a tiny verification
  page (``?user_code=..&user=..`` approves) for manual demos; tests use :meth:`approve_device`.
* ``POST /introspect`` (RFC 7662): what Dovecot's ``oauth2`` passdb calls with
  ``introspection_mode = post``.

Error answers use the RFC 6749 §5.2 JSON shape ``{"error": ..., "error_description": ...}``.
Tokens are opaque ``secrets.token_urlsafe`` strings; every secret ever handed out is kept so a
test can scan logs for leaks (:meth:`LabOAuthServer.all_secrets`).

Failure injection for the token endpoint (introspection is unaffected) is ``fail_mode``:
``None``, ``("status", 503)``, ``("hang", seconds)`` or ``("malformed",)``. The introspection
endpoint has its own ``introspection_fail_mode`` (``None`` or ``("status", 503)``) to make
Dovecot answer with a temporary failure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import json
import secrets
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = ["LabOAuthServer", "GRANT_DEVICE_CODE", "GRANT_JWT_BEARER"]

GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GRANT_DEVICE_CODE = "urn:ietf:params:oauth:grant-type:device_code"

#: Largest request body the server reads (form posts are tiny).
MAX_BODY_BYTES = 64 * 1024
#: How long an authorization code stays valid (RFC 6749 recommends at most 10 minutes).
AUTHORIZATION_CODE_LIFETIME = 600.0
#: Device codes (RFC 8628) expire after this many seconds unless set per server.
DEVICE_CODE_LIFETIME = 600
#: RFC 8628 §3.5: on ``slow_down`` the client must add 5 seconds to its interval.
DEVICE_SLOW_DOWN_INCREMENT = 5
#: Largest accepted ``exp - iat`` of a JWT bearer assertion (Google's rule).
JWT_MAX_LIFETIME = 3600
#: Clock skew tolerated on a JWT's ``iat``.
JWT_CLOCK_SKEW = 60
#: An idle keep-alive connection is closed after this many seconds.
KEEPALIVE_TIMEOUT = 60.0
#: Upper bound of a ``("hang", seconds)`` failure; ``stop()`` ends a hang early anyway.
MAX_HANG_SECONDS = 600.0


class _OAuthError(Exception):
    """An RFC 6749 error answer: HTTP status + ``error`` code + description."""

    def __init__(self, error: str, description: str, status: int = 400):
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


@dataclass
class _AccessToken:
    user: str
    scope: str
    client_id: str
    expires_at: float
    active: bool = True


@dataclass
class _RefreshToken:
    user: str
    scope: str
    client_id: str
    active: bool = True


@dataclass
class _AuthorizationCode:
    user: str
    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str | None
    code_challenge_method: str | None
    expires_at: float


@dataclass
class _DeviceGrant:
    user_code: str
    client_id: str
    scope: str
    expires_at: float
    interval: int
    status: str = "pending"  # pending | approved | denied | used
    user: str | None = None
    last_poll: float | None = None


@dataclass
class _State:
    access: dict[str, _AccessToken] = field(default_factory=dict)
    refresh: dict[str, _RefreshToken] = field(default_factory=dict)
    codes: dict[str, _AuthorizationCode] = field(default_factory=dict)
    devices: dict[str, _DeviceGrant] = field(default_factory=dict)
    user_codes: dict[str, str] = field(default_factory=dict)  # user_code -> device_code
    jwt_issuers: dict[str, rsa.RSAPublicKey] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    introspections: list[dict[str, Any]] = field(default_factory=list)


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def pkce_challenge(verifier: str) -> str:
    """The RFC 7636 S256 ``code_challenge`` of ``verifier``."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class LabOAuthServer:
    """A real HTTP OAuth 2.0 server on ``127.0.0.1:<free port>`` in a background thread.

    Usage::

        with LabOAuthServer() as srv:
            access, refresh = srv.issue_tokens("alice@example.com")
            httpx.post(srv.token_url, data={...})

    Attributes tests may set at any time (they are read under the lock):

    * ``rotate_refresh_tokens`` -- a refresh grant returns a new refresh token and kills the old.
    * ``fail_mode`` -- ``None | ("status", code) | ("hang", seconds) | ("malformed",)`` for
      ``/token`` and ``/device``.
    * ``introspection_fail_mode`` -- ``None | ("status", code)`` for ``/introspect``.
    * ``client_credentials_user`` -- the mailbox an app-only token is for.
    * ``default_user`` -- the user ``/authorize`` approves when there is no ``login_hint``.
    * ``access_token_lifetime`` -- seconds, for tokens issued from then on.
    * ``device_interval`` -- the polling interval (seconds) announced by ``/device``.
    """

    def __init__(
        self,
        client_id: str = "mailgate",
        client_secret: str | None = "secret",
        access_token_lifetime: int = 3600,
        *,
        default_user: str = "alice@example.com",
        device_interval: int = 1,
        device_code_lifetime: int = DEVICE_CODE_LIFETIME,
    ) -> None:
        self.client_id = client_id
        #: ``None`` makes the client public: only ``client_id`` is checked.
        self.client_secret = client_secret
        self.access_token_lifetime = access_token_lifetime
        self.default_user = default_user
        self.device_interval = device_interval
        self.device_code_lifetime = device_code_lifetime
        self._initial_settings = {
            "access_token_lifetime": access_token_lifetime,
            "default_user": default_user,
            "device_interval": device_interval,
            "device_code_lifetime": device_code_lifetime,
        }
        self.rotate_refresh_tokens = False
        self.fail_mode: tuple[Any, ...] | None = None
        self.introspection_fail_mode: tuple[Any, ...] | None = None
        self.client_credentials_user = "alice@example.com"
        self._lock = threading.Lock()
        self._state = _State()
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def reset_settings(self) -> None:
        """Undo what tests may have switched: failure modes, rotation, the client-credentials
        user and the constructor's lifetimes/intervals. Issued tokens stay as they are.
        (``tests/conftest.py`` calls this after every test that used the server.)"""
        with self._lock:
            self.rotate_refresh_tokens = False
            self.fail_mode = None
            self.introspection_fail_mode = None
            self.client_credentials_user = "alice@example.com"
            for name, value in self._initial_settings.items():
                setattr(self, name, value)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> LabOAuthServer:
        """Bind a free loopback port and serve in a daemon thread. Returns ``self``."""
        if self._httpd is not None:
            raise RuntimeError("LabOAuthServer already started")
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.lab = self
        self._httpd = httpd
        self._stopping.clear()
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="lab-oauth-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; ends any injected hang. Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()  # keep-alive clients (Dovecot's auth) would pin threads
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LabOAuthServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- URLs

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("LabOAuthServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def authorize_url(self) -> str:
        return self.url + "/authorize"

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def device_url(self) -> str:
        return self.url + "/device"

    @property
    def verification_url(self) -> str:
        return self.url + "/verify"

    @property
    def introspect_url(self) -> str:
        return self.url + "/introspect"

    # ----------------------------------------------------------------- test controls

    def issue_tokens(
        self, user: str, scope: str = "mail", *, client_id: str | None = None
    ) -> tuple[str, str]:
        """Mint an ``(access_token, refresh_token)`` pair for ``user`` without any HTTP."""
        with self._lock:
            access = self._new_access_locked(user, scope, client_id or self.client_id)
            refresh = self._new_refresh_locked(user, scope, client_id or self.client_id)
        return access, refresh

    def revoke(self, token: str) -> None:
        """Revoke an access or refresh token (introspection: inactive; refresh: invalid_grant)."""
        with self._lock:
            if token in self._state.access:
                self._state.access[token].active = False
            elif token in self._state.refresh:
                self._state.refresh[token].active = False
            else:
                raise KeyError("unknown token")

    def expire(self, access_token: str) -> None:
        """Make an access token expired: introspection then answers ``active: false``."""
        with self._lock:
            self._state.access[access_token].expires_at = time.time() - 1

    def is_active(self, access_token: str) -> bool:
        """Whether introspection would currently call ``access_token`` active."""
        with self._lock:
            return self._introspect_locked(access_token) is not None

    def register_jwt_issuer(self, iss: str, public_key_pem: bytes | str) -> None:
        """Trust RS256 JWT bearer assertions from ``iss`` signed by this RSA public key."""
        if isinstance(public_key_pem, str):
            public_key_pem = public_key_pem.encode("ascii")
        key = serialization.load_pem_public_key(public_key_pem)
        if not isinstance(key, rsa.RSAPublicKey):
            raise TypeError("JWT issuers must use an RSA key (RS256)")
        with self._lock:
            self._state.jwt_issuers[iss] = key

    def approve_device(self, user_code: str, user: str) -> None:
        """Approve a pending device authorization as ``user`` (what the user does in a browser)."""
        self._decide_device(user_code, "approved", user)

    def deny_device(self, user_code: str) -> None:
        """Deny a pending device authorization: the next poll gets ``access_denied``."""
        self._decide_device(user_code, "denied", None)

    @property
    def token_requests(self) -> list[dict[str, Any]]:
        """A copy of every ``/token`` request seen: ``grant_type``, ``client_id``, ``time``,
        ``status`` (HTTP) and ``error`` (the OAuth error code or ``None``)."""
        with self._lock:
            return [dict(r) for r in self._state.token_requests]

    @property
    def introspections(self) -> list[dict[str, Any]]:
        """A copy of every ``/introspect`` request seen: ``time`` and ``active``."""
        with self._lock:
            return [dict(r) for r in self._state.introspections]

    def all_secrets(self) -> list[str]:
        """Every secret this server ever issued: access and refresh tokens, authorization
        and device codes (all long random strings, safe to grep logs for). The client
        secret is not included: the default ``"secret"`` is a common word; pass a random
        ``client_secret`` to the constructor and check ``client_secret`` separately."""
        with self._lock:
            return list(self._state.secrets)

    # ----------------------------------------------------------------- internals (locked)

    def _remember_locked(self, secret: str) -> str:
        self._state.secrets.append(secret)
        return secret

    def _new_access_locked(self, user: str, scope: str, client_id: str) -> str:
        token = self._remember_locked("at-" + secrets.token_urlsafe(32))
        self._state.access[token] = _AccessToken(
            user, scope, client_id, time.time() + self.access_token_lifetime
        )
        return token

    def _new_refresh_locked(self, user: str, scope: str, client_id: str) -> str:
        token = self._remember_locked("rt-" + secrets.token_urlsafe(32))
        self._state.refresh[token] = _RefreshToken(user, scope, client_id)
        return token

    def _introspect_locked(self, token: str) -> _AccessToken | None:
        record = self._state.access.get(token)
        if record is None or not record.active or record.expires_at <= time.time():
            return None
        return record

    def _decide_device(self, user_code: str, status: str, user: str | None) -> None:
        with self._lock:
            device_code = self._state.user_codes.get(user_code.upper())
            if device_code is None:
                raise KeyError(f"unknown user code {user_code!r}")
            grant = self._state.devices[device_code]
            if grant.status != "pending":
                raise ValueError(f"device code already {grant.status}")
            grant.status = status
            grant.user = user

    def _token_answer_locked(
        self, user: str, scope: str, client_id: str, *, with_refresh: bool
    ) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "access_token": self._new_access_locked(user, scope, client_id),
            "token_type": "Bearer",
            "expires_in": self.access_token_lifetime,
            "scope": scope,
        }
        if with_refresh:
            answer["refresh_token"] = self._new_refresh_locked(user, scope, client_id)
        return answer

    # ----------------------------------------------------------------- endpoint logic

    def _check_client(self, form: dict[str, str], basic: tuple[str, str] | None) -> str:
        """Authenticate the client (form fields or HTTP Basic); return its client_id."""
        if basic is not None:
            client_id, client_secret = basic
        else:
            client_id, client_secret = form.get("client_id", ""), form.get("client_secret")
        if client_id != self.client_id:
            raise _OAuthError("invalid_client", "unknown client", 401)
        if self.client_secret is not None and client_secret != self.client_secret:
            raise _OAuthError("invalid_client", "client authentication failed", 401)
        return client_id

    def handle_authorize(self, query: dict[str, str]) -> str:
        """Validate an authorization request; return the redirect Location."""
        if query.get("response_type") != "code":
            raise _OAuthError("unsupported_response_type", "only response_type=code")
        if query.get("client_id") != self.client_id:
            raise _OAuthError("invalid_client", "unknown client")
        redirect_uri = query.get("redirect_uri")
        if not redirect_uri:
            raise _OAuthError("invalid_request", "redirect_uri is required")
        challenge = query.get("code_challenge")
        method = query.get("code_challenge_method")
        if challenge is not None and method != "S256":
            raise _OAuthError("invalid_request", "only code_challenge_method=S256")
        user = query.get("login_hint") or self.default_user
        with self._lock:
            code = self._remember_locked("ac-" + secrets.token_urlsafe(24))
            self._state.codes[code] = _AuthorizationCode(
                user=user,
                client_id=self.client_id,
                redirect_uri=redirect_uri,
                scope=query.get("scope", ""),
                code_challenge=challenge,
                code_challenge_method=method,
                expires_at=time.time() + AUTHORIZATION_CODE_LIFETIME,
            )
        params = {"code": code}
        if "state" in query:
            params["state"] = query["state"]
        separator = "&" if "?" in redirect_uri else "?"
        return redirect_uri + separator + urllib.parse.urlencode(params)

    def handle_token(self, form: dict[str, str], basic: tuple[str, str] | None) -> dict[str, Any]:
        grant_type = form.get("grant_type", "")
        if grant_type == "authorization_code":
            return self._grant_authorization_code(form, basic)
        if grant_type == "refresh_token":
            return self._grant_refresh_token(form, basic)
        if grant_type == "client_credentials":
            client_id = self._check_client(form, basic)
            with self._lock:
                return self._token_answer_locked(
                    self.client_credentials_user, form.get("scope", ""), client_id,
                    with_refresh=False,
                )
        if grant_type == GRANT_JWT_BEARER:
            return self._grant_jwt_bearer(form)
        if grant_type == GRANT_DEVICE_CODE:
            return self._grant_device_code(form, basic)
        raise _OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} not supported")

    def _grant_authorization_code(
        self, form: dict[str, str], basic: tuple[str, str] | None
    ) -> dict[str, Any]:
        client_id = self._check_client(form, basic)
        with self._lock:
            record = self._state.codes.pop(form.get("code", ""), None)  # single use
            if record is None or record.expires_at <= time.time():
                raise _OAuthError("invalid_grant", "unknown, used or expired code")
            if record.client_id != client_id:
                raise _OAuthError("invalid_grant", "code was issued to another client")
            if form.get("redirect_uri") != record.redirect_uri:
                raise _OAuthError("invalid_grant", "redirect_uri mismatch")
            if record.code_challenge is not None:
                verifier = form.get("code_verifier")
                if not verifier:
                    raise _OAuthError("invalid_request", "code_verifier is required")
                if not secrets.compare_digest(pkce_challenge(verifier), record.code_challenge):
                    raise _OAuthError("invalid_grant", "PKCE verification failed")
            return self._token_answer_locked(
                record.user, record.scope, client_id, with_refresh=True
            )

    def _grant_refresh_token(
        self, form: dict[str, str], basic: tuple[str, str] | None
    ) -> dict[str, Any]:
        client_id = self._check_client(form, basic)
        with self._lock:
            token = form.get("refresh_token", "")
            record = self._state.refresh.get(token)
            if record is None or not record.active or record.client_id != client_id:
                raise _OAuthError("invalid_grant", "refresh token is invalid or revoked")
            rotate = self.rotate_refresh_tokens
            if rotate:
                record.active = False
            return self._token_answer_locked(
                record.user, record.scope, client_id, with_refresh=rotate
            )

    def _grant_jwt_bearer(self, form: dict[str, str]) -> dict[str, Any]:
        claims = self._verify_jwt(form.get("assertion", ""))
        user = str(claims.get("sub") or claims["iss"])
        scope = str(claims.get("scope", form.get("scope", "")))
        with self._lock:
            return self._token_answer_locked(user, scope, str(claims["iss"]), with_refresh=False)

    def _verify_jwt(self, assertion: str) -> dict[str, Any]:
        try:
            head_b64, claims_b64, signature_b64 = assertion.split(".")
            header = json.loads(_b64url_decode(head_b64))
            claims = json.loads(_b64url_decode(claims_b64))
            signature = _b64url_decode(signature_b64)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise _OAuthError("invalid_grant", "malformed JWT assertion") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise _OAuthError("invalid_grant", "malformed JWT assertion")
        if header.get("alg") != "RS256":
            raise _OAuthError("invalid_grant", "only RS256 assertions are accepted")
        with self._lock:
            key = self._state.jwt_issuers.get(str(claims.get("iss")))
        if key is None:
            raise _OAuthError("invalid_grant", "unknown issuer")
        signing_input = f"{head_b64}.{claims_b64}".encode("ascii")
        try:
            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise _OAuthError("invalid_grant", "bad JWT signature") from None
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self.token_url not in audiences:
            raise _OAuthError("invalid_grant", "aud must be the token endpoint")
        now = time.time()
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, (int, float)) or not isinstance(iat, (int, float)):
            raise _OAuthError("invalid_grant", "exp and iat are required")
        if exp <= now:
            raise _OAuthError("invalid_grant", "assertion expired")
        if iat > now + JWT_CLOCK_SKEW or exp - iat > JWT_MAX_LIFETIME:
            raise _OAuthError("invalid_grant", "bad iat or lifetime over one hour")
        return claims

    def handle_device(self, form: dict[str, str], basic: tuple[str, str] | None) -> dict[str, Any]:
        if basic is None and self.client_secret is not None and "client_secret" not in form:
            # Public device clients send only client_id (RFC 8628 §3.1).
            if form.get("client_id") != self.client_id:
                raise _OAuthError("invalid_client", "unknown client", 401)
            client_id = self.client_id
        else:
            client_id = self._check_client(form, basic)
        with self._lock:
            device_code = self._remember_locked("dc-" + secrets.token_urlsafe(24))
            user_code = self._new_user_code_locked()
            self._state.devices[device_code] = _DeviceGrant(
                user_code=user_code,
                client_id=client_id,
                scope=form.get("scope", ""),
                expires_at=time.time() + self.device_code_lifetime,
                interval=self.device_interval,
            )
            self._state.user_codes[user_code] = device_code
        return {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": self.verification_url,
            "verification_uri_complete": f"{self.verification_url}?user_code={user_code}",
            "expires_in": self.device_code_lifetime,
            "interval": self.device_interval,
        }

    def _new_user_code_locked(self) -> str:
        alphabet = "BCDFGHJKLMNPQRSTVWXZ"  # RFC 8628 §6.1: no vowels, no look-alikes
        while True:
            raw = "".join(secrets.choice(alphabet) for _ in range(8))
            code = f"{raw[:4]}-{raw[4:]}"
            if code not in self._state.user_codes:
                return code

    def _grant_device_code(
        self, form: dict[str, str], basic: tuple[str, str] | None
    ) -> dict[str, Any]:
        if basic is not None or "client_secret" in form:
            client_id = self._check_client(form, basic)
        elif form.get("client_id") == self.client_id:
            client_id = self.client_id
        else:
            raise _OAuthError("invalid_client", "unknown client", 401)
        now = time.time()
        with self._lock:
            grant = self._state.devices.get(form.get("device_code", ""))
            if grant is None or grant.client_id != client_id or grant.status == "used":
                raise _OAuthError("invalid_grant", "unknown or used device code")
            if grant.expires_at <= now:
                raise _OAuthError("expired_token", "the device code has expired")
            last_poll, grant.last_poll = grant.last_poll, now
            if grant.status == "denied":
                raise _OAuthError("access_denied", "the user denied the request")
            if grant.status == "pending":
                if last_poll is not None and now - last_poll < grant.interval:
                    grant.interval += DEVICE_SLOW_DOWN_INCREMENT
                    raise _OAuthError("slow_down", "polling too fast")
                raise _OAuthError("authorization_pending", "the user has not answered yet")
            grant.status = "used"
            assert grant.user is not None
            return self._token_answer_locked(grant.user, grant.scope, client_id, with_refresh=True)

    def handle_introspect(self, form: dict[str, str]) -> dict[str, Any]:
        token = form.get("token", "")
        with self._lock:
            record = self._introspect_locked(token)
            self._state.introspections.append({"time": time.time(), "active": record is not None})
            if record is None:
                return {"active": False}
            return {
                "active": True,
                "username": record.user,
                "scope": record.scope,
                "client_id": record.client_id,
                "token_type": "Bearer",
                "exp": int(record.expires_at),
            }

    def record_token_request(self, form: dict[str, str], client_id: str | None,
                             status: int, error: str | None) -> None:
        with self._lock:
            self._state.token_requests.append({
                "grant_type": form.get("grant_type"),
                "client_id": client_id,
                "time": time.time(),
                "status": status,
                "error": error,
            })

    def injected_failure(self) -> tuple[Any, ...] | None:
        """The current ``fail_mode`` (read once per request)."""
        with self._lock:
            return self.fail_mode

    def wait_for_hang(self, seconds: float) -> None:
        self._stopping.wait(min(float(seconds), MAX_HANG_SECONDS))


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that knows its open connections, to close them on stop."""

    daemon_threads = True
    block_on_close = False
    lab: LabOAuthServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open connection; each handler thread then closes its socket."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the :class:`LabOAuthServer` logic and writes JSON answers."""

    protocol_version = "HTTP/1.1"
    server_version = "LabOAuth/1.0"
    timeout = KEEPALIVE_TIMEOUT
    server: _Server

    @property
    def lab(self) -> LabOAuthServer:
        return self.server.lab

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silence the default stderr access log (request lines may carry codes)."""

    # -- plumbing

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send_error(self, err: _OAuthError) -> None:
        headers = {"WWW-Authenticate": "Basic"} if err.status == 401 else None
        body = json.dumps({"error": err.error, "error_description": err.description}).encode()
        self._send(err.status, body, "application/json", headers)

    def _read_form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise _OAuthError("invalid_request", "request body too large", 413)
        raw = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        return dict(urllib.parse.parse_qsl(raw, keep_blank_values=True))

    def _basic_auth(self) -> tuple[str, str] | None:
        header = self.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            client_id, _, client_secret = decoded.partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise _OAuthError("invalid_client", "malformed Basic credentials", 401) from None
        return urllib.parse.unquote(client_id), urllib.parse.unquote(client_secret)

    def _apply_failure(self, mode: tuple[Any, ...] | None) -> bool:
        """Apply an injected token-endpoint failure; True if the answer was sent."""
        if mode is None:
            return False
        kind = mode[0]
        if kind == "status":
            self._send_json(int(mode[1]), {
                "error": "temporarily_unavailable",
                "error_description": "injected failure",
            })
            return True
        if kind == "hang":
            self.lab.wait_for_hang(float(mode[1]))
            self.close_connection = True
            return True
        if kind == "malformed":
            self._send(200, b'{"access_token": "truncated', "application/json")
            return True
        raise ValueError(f"unknown fail_mode {mode!r}")

    # -- verbs

    def do_GET(self) -> None:  # noqa: N802
        parsed = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
        try:
            if parsed.path == "/authorize":
                location = self.lab.handle_authorize(query)
                self._send(HTTPStatus.FOUND, b"", "text/plain", {"Location": location})
            elif parsed.path == "/verify":
                self._verify_page(query)
            else:
                self._send_json(404, {"error": "not_found", "error_description": parsed.path})
        except _OAuthError as err:
            self._send_error(err)

    def _verify_page(self, query: dict[str, str]) -> None:
        """Manual device verification for demos: ``/verify?user_code=X&user=Y`` approves."""
        user_code, user = query.get("user_code"), query.get("user")
        if user_code and user:
            try:
                self.lab.approve_device(user_code, user)
                text = f"Approved {html.escape(user_code)} for {html.escape(user)}."
            except (KeyError, ValueError) as exc:
                text = f"Cannot approve: {html.escape(str(exc))}"
        else:
            text = ("<form>User code <input name=user_code> as user <input name=user>"
                    " <button>Approve</button></form>")
        page = f"<!doctype html><title>Lab device verification</title><p>{text}</p>"
        self._send(200, page.encode(), "text/html; charset=utf-8")

    def do_POST(self) -> None:  # noqa: N802
        path = urllib.parse.urlsplit(self.path).path
        form: dict[str, str] = {}
        try:
            form = self._read_form()
            if path == "/introspect":
                mode = self.lab.introspection_fail_mode
                if mode is not None and mode[0] == "status":
                    self._send_json(int(mode[1]), {"error": "temporarily_unavailable"})
                    return
                self._send_json(200, self.lab.handle_introspect(form))
            elif path == "/token":
                self._token(form)
            elif path == "/device":
                if not self._apply_failure(self.lab.injected_failure()):
                    self._send_json(200, self.lab.handle_device(form, self._basic_auth()))
            else:
                self._send_json(404, {"error": "not_found", "error_description": path})
        except _OAuthError as err:
            self._send_error(err)

    def _token(self, form: dict[str, str]) -> None:
        basic: tuple[str, str] | None = None
        client_id = form.get("client_id")
        try:
            basic = self._basic_auth()
            if basic is not None:
                client_id = basic[0]
            mode = self.lab.injected_failure()
            if mode is not None:
                status = int(mode[1]) if mode[0] == "status" else 0
                self.lab.record_token_request(form, client_id, status, "injected")
                self._apply_failure(mode)
                return
            answer = self.lab.handle_token(form, basic)
        except _OAuthError as err:
            self.lab.record_token_request(form, client_id, err.status, err.error)
            self._send_error(err)
            return
        self.lab.record_token_request(form, client_id, 200, None)
        self._send_json(200, answer)
