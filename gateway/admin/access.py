"""Who may use the admin port: loopback by default, an admin token otherwise.

Theory of operation
-------------------
Two modes, chosen by the config (``[admin] bind`` / ``token``):

* **No token** (the default; the config refuses a non-loopback ``bind`` without one): only
  loopback peers are served, and the ``Host`` header must name a loopback host or the bind
  host. The second rule defeats DNS rebinding: a web page on ``evil.example`` whose name
  re-resolves to 127.0.0.1 makes the browser send ``Host: evil.example``, which is refused.
  ``Host`` is parsed as a URL authority (:func:`parse_authority`), not split at the first
  ``:``: ``127.0.0.1:8025@evil.example`` is not a loopback host.
* **Token**: every request must carry it, either as ``Authorization: Bearer <token>``
  (Prometheus, curl) or as the session cookie a browser gets from ``POST /login``. The cookie
  holds an HMAC of the token, not the token; comparisons are constant-time.

Whatever the mode, a request that can change state (a POST) or open the event stream (a
WebSocket upgrade) must not come from another web origin: when the browser sends ``Origin``,
it must be this server (cross-site WebSocket hijacking and login CSRF are refused here; the
authorization form has its own CSRF token as well).

In both modes a ``Host`` that is not a plain authority (userinfo ``@``, a path, spaces) is
refused with 400: the value is used to build the OAuth ``redirect_uri``.

``/healthz`` and the login page are open to any allowed peer: they reveal nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
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


#: RFC 3986 §3.2.2 host, as a browser or HTTP client sends it in ``Host``: a bracketed IPv6
#: literal, or a registered name / IPv4 address (letters, digits, ``-``, ``.``, ``_``), with an
#: optional numeric port. Nothing else: no userinfo (``@``), path, query, space or percent.
_AUTHORITY = re.compile(r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?")


def parse_authority(authority: str) -> tuple[str, int | None] | None:
    """``127.0.0.1:8025`` → ``("127.0.0.1", 8025)``; ``[::1]`` → ``("::1", None)``; None when
    the value is not a plain URL authority (``127.0.0.1:80@evil.example``, ``a/b``, ``a b``)."""
    match = _AUTHORITY.fullmatch(authority.strip())
    if match is None:
        return None
    host = match.group("ip6")
    if host is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        host = match.group("name")
    port = match.group("port")
    if port is not None and int(port) > 65535:
        return None
    return host, int(port) if port is not None else None


def host_of(authority: str) -> str:
    """``127.0.0.1:8025`` → ``127.0.0.1``; ``[::1]:8025`` → ``::1``; ``""`` when the value is
    not a plain authority (see :func:`parse_authority`)."""
    parsed = parse_authority(authority)
    return parsed[0] if parsed is not None else ""


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
        host_header = request.header("host")
        if host_header is not None and parse_authority(host_header) is None:
            # The Host value ends up in URLs (the OAuth redirect_uri): only a plain authority.
            return text("bad Host header\n", 400)
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
