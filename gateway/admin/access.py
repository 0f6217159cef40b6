"""Who may use the admin port: loopback by default, an admin token otherwise.

Theory of operation
-------------------
Two modes, chosen by the config (``[admin] bind`` / ``token``):

* **No token** (the default; the config refuses a non-loopback ``bind`` without one): only
  loopback peers are served, and the ``Host`` header must name a loopback host or the bind
  host. The second rule defeats DNS rebinding: a web page on ``evil.example`` whose name
  re-resolves to 127.0.0.1 makes the browser send ``Host: evil.example``, which is refused.
* **Token**: every request must carry it, either as ``Authorization: Bearer <token>``
  (Prometheus, curl) or as the session cookie a browser gets from ``POST /login``. The cookie
  holds an HMAC of the token, not the token; comparisons are constant-time.

Whatever the mode, a request that can change state (a POST) or open the event stream (a
WebSocket upgrade) must not come from another web origin: when the browser sends ``Origin``,
it must be this server (cross-site WebSocket hijacking and login CSRF are refused here; the
authorization form has its own CSRF token as well).

``/healthz`` and the login page are open to any allowed peer: they reveal nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import urllib.parse

from ..config import AdminSection
from .wire import Request, Response, redirect, text

SESSION_COOKIE = "mailgate_admin"
SESSION_MAX_AGE = 12 * 3600  # seconds a browser stays logged in
OPEN_PATHS = frozenset({"/healthz", "/login"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").split("%", 1)[0]
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def host_of(authority: str) -> str:
    """``127.0.0.1:8025`` → ``127.0.0.1``; ``[::1]:8025`` → ``::1``."""
    authority = authority.strip()
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    if authority.count(":") == 1:
        return authority.partition(":")[0]
    return authority


class AdminAccess:
    def __init__(self, admin: AdminSection):
        self._token = admin.token.get_secret_value() if admin.token is not None else None
        self._bind_host = admin.host
        self._session = (
            hmac.new(self._token.encode(), b"mailgate admin session", hashlib.sha256).hexdigest()
            if self._token
            else None
        )

    @property
    def token_required(self) -> bool:
        return self._token is not None

    def check(self, request: Request) -> Response | None:
        """None if the request may proceed, else the refusal to send."""
        if not self.token_required:
            if not is_loopback_host(request.peer_host):
                return text("the admin port only serves loopback clients\n", 403)
            host = host_of(request.header("host") or "")
            if not (is_loopback_host(host) or host == self._bind_host):
                return text("unexpected Host header\n", 403)
        if (request.method == "POST" or request.is_websocket_upgrade) and not self.same_origin(
            request
        ):
            return text("cross-origin request refused\n", 403)
        if not self.token_required or request.path in OPEN_PATHS or self.authenticated(request):
            return None
        if request.method == "GET" and not request.is_websocket_upgrade:
            return redirect("/login?next=" + urllib.parse.quote(request.target, safe=""))
        response = text("admin token required\n", 401)
        response.headers.append(("WWW-Authenticate", 'Bearer realm="mailgate admin"'))
        return response

    def authenticated(self, request: Request) -> bool:
        assert self._token is not None and self._session is not None
        authorization = request.header("authorization") or ""
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credential.strip().encode(), self._token.encode()
        ):
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self._session.encode())

    def token_matches(self, candidate: str) -> bool:
        return self._token is not None and hmac.compare_digest(
            candidate.encode(), self._token.encode()
        )

    def session_cookie(self) -> str:
        assert self._session is not None
        return (
            f"{SESSION_COOKIE}={self._session}; Path=/; HttpOnly; SameSite=Lax; "
            f"Max-Age={SESSION_MAX_AGE}"
        )

    @staticmethod
    def same_origin(request: Request) -> bool:
        origin = request.header("origin")
        if origin is None:
            return True  # not a browser, or a same-origin GET navigation
        parts = urllib.parse.urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == (request.header("host") or "")
