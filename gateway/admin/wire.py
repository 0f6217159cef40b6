"""Plain HTTP values for the admin plane: what a request carries and what a response sends.

Theory of operation
-------------------
The admin port speaks HTTP/1.1 through h11 (see :mod:`gateway.admin.http`, the I/O driver).
This module holds the sans-IO half: :class:`Request` is a fully read request (head and small
body), :class:`Response` is a complete answer, and the helpers parse what the routes need
(query strings, ``application/x-www-form-urlencoded`` bodies, cookies) and build the common
answers (HTML, JSON, plain text, redirects). Nothing here imports trio or touches a socket, so
all of it is tested byte for byte.

Every response carries the same protective headers (:data:`SECURITY_HEADERS`): no caching (the
pages show live state and, on the authorization pages, one-time values), no framing, no MIME
sniffing, no referrer to other sites (an OAuth callback URL carries a code in its query; a
``no-referrer`` policy would make browsers send ``Origin: null`` on our own forms), and a strict
Content-Security-Policy (same-origin scripts and WebSocket only).
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

MAX_HEAD_BYTES = 16 * 1024  # request line + headers
MAX_BODY_BYTES = 64 * 1024  # the admin plane only ever receives small forms

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Cache-Control", "no-store"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
)


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # as sent: path plus query string
    headers: tuple[tuple[str, str], ...]  # names lower-case
    body: bytes = b""
    peer_host: str = ""

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target).path or "/"

    @property
    def query(self) -> dict[str, str]:
        return parse_form(urllib.parse.urlsplit(self.target).query)

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def cookies(self) -> dict[str, str]:
        return parse_cookies(self.header("cookie") or "")

    def form(self) -> dict[str, str]:
        """The body of an ``application/x-www-form-urlencoded`` POST."""
        ctype = (self.header("content-type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return {}
        return parse_form(self.body.decode("utf-8", "replace"))

    @property
    def is_websocket_upgrade(self) -> bool:
        upgrade = (self.header("upgrade") or "").lower()
        connection = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        return self.method == "GET" and upgrade == "websocket" and "upgrade" in connection


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def all_headers(self) -> list[tuple[str, str]]:
        """Headers to send: content type and length, the security set, then the route's own."""
        return [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(self.body))),
            ("Connection", "close"),
            *SECURITY_HEADERS,
            *self.headers,
        ]


def parse_form(text: str) -> dict[str, str]:
    """``a=1&b=2`` → dict; the first value of a repeated key wins; blank values are kept."""
    out: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(text, keep_blank_values=True):
        out.setdefault(key, value)
    return out


def parse_cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            out.setdefault(name, value.strip().strip('"'))
    return out


def html(body: str, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, body.encode("utf-8"), "text/html; charset=utf-8", headers or [])


def text(body: str, status: int = 200, content_type: str = "text/plain; charset=utf-8") -> Response:
    return Response(status, body.encode("utf-8"), content_type)


def json_response(value: Any, status: int = 200) -> Response:
    body = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return Response(status, body.encode("utf-8"), "application/json")


def redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(303, b"", "text/plain; charset=utf-8", [("Location", location), *(headers or [])])


def not_found() -> Response:
    return text("not found\n", 404)


def method_not_allowed(allowed: str) -> Response:
    response = text("method not allowed\n", 405)
    response.headers.append(("Allow", allowed))
    return response
