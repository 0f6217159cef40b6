"""An HTTP ``CONNECT`` tunnel request and its answer, sans-IO (RFC 9110 §9.3.6).

Theory of operation
-------------------
Corporate networks often reach the internet only through an HTTP proxy. To speak IMAP (or
SMTP) through it, mailgate opens a TCP connection to the proxy, asks it for a tunnel and, once
the proxy answers 2xx, uses the same connection as if it were a TCP connection to the upstream
server (the TLS handshake with the upstream happens inside the tunnel, end to end).

Rules, in order:

1. The request is ``CONNECT host:port HTTP/1.1`` with ``Host: host:port``; IPv6 hosts are
   bracketed. Credentials in the proxy URL become ``Proxy-Authorization: Basic ...`` (RFC 7617);
   nothing else is sent (no body, no user agent beyond :data:`USER_AGENT`).
2. The proxy's answer is parsed by h11 (itself sans-IO). A 2xx answer ends the HTTP part: the
   bytes after its header block (``leftover``) already belong to the tunnel and must be handed
   to whoever reads the tunnel first.
3. Any other status is a refusal: 407 (or 401, tinyproxy's answer to wrong credentials) means
   the proxy wants (other) credentials, anything else
   (403, 502, ...) that it will not or cannot reach the upstream. The answer's status line is
   kept for the message; its body is ignored.
4. An answer whose header block grows beyond ``max_head`` bytes, or that is not HTTP at all,
   is a :class:`ProxyProtocolError`.

:class:`ConnectHandshake` holds the state: :meth:`~ConnectHandshake.request` gives the bytes to
send, :meth:`~ConnectHandshake.feed` takes what the proxy sent and returns a
:class:`ConnectAnswer` once the answer's header block is complete (``None`` before). It never
touches a socket; :mod:`gateway.upstream.proxy` drives it with trio.

The credentials are never part of an exception message or a ``repr``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import h11

__all__ = ["ConnectAnswer", "ConnectHandshake", "ProxyProtocolError", "ProxyURL", "parse_proxy_url"]

USER_AGENT = b"mailgate"
DEFAULT_MAX_HEAD = 16384


class ProxyProtocolError(ValueError):
    """The proxy's answer is not an HTTP answer mailgate can use."""


@dataclass(frozen=True)
class ProxyURL:
    """An ``http://[user:password@]host:port`` proxy, split."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """``host:port``: what logs and messages may show."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_proxy_url(url: str) -> ProxyURL:
    """Split a proxy URL (``ValueError`` for anything but ``http://host:port``)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("not a proxy URL (write http://[user:password@]host:port)") from None
    if parts.scheme != "http" or not parts.hostname or port is None:
        raise ValueError("not a proxy URL (write http://[user:password@]host:port)")
    return ProxyURL(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


@dataclass(frozen=True)
class ConnectAnswer:
    status: int
    reason: str
    leftover: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def wants_credentials(self) -> bool:
        """407 (RFC 9110 §15.5.8); some proxies (tinyproxy) answer wrong credentials with 401."""
        return self.status in (401, 407)


class ConnectHandshake:
    """One CONNECT exchange with a proxy, for a tunnel to ``host:port``."""

    def __init__(self, proxy: ProxyURL, host: str, port: int, *, max_head: int = DEFAULT_MAX_HEAD):
        self.proxy = proxy
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)

    def request(self) -> bytes:
        headers = [("Host", self.target), ("User-Agent", USER_AGENT.decode())]
        if self.proxy.username is not None:
            pair = f"{self.proxy.username}:{self.proxy.password or ''}".encode()
            headers.append(("Proxy-Authorization", "Basic " + base64.b64encode(pair).decode()))
        data = self._conn.send(h11.Request(method="CONNECT", target=self.target, headers=headers))
        data += self._conn.send(h11.EndOfMessage()) or b""
        return data or b""

    def feed(self, data: bytes) -> ConnectAnswer | None:
        """Bytes from the proxy (``b""``: it closed the connection). The answer once its header
        block is complete, else ``None``. 1xx answers before the real one are skipped."""
        self._conn.receive_data(data)
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ProxyProtocolError(
                    f"proxy {self.proxy.where} sent no valid HTTP answer ({exc})"
                ) from None
            if event is h11.NEED_DATA:
                if not data:
                    raise ProxyProtocolError(
                        f"proxy {self.proxy.where} closed the connection without an answer"
                    )
                return None
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                reason = event.reason.decode("latin-1", "replace").strip()
                if not 200 <= event.status_code < 300:
                    return ConnectAnswer(event.status_code, reason)
                leftover, _closed = self._conn.trailing_data
                return ConnectAnswer(event.status_code, reason, bytes(leftover))
            if isinstance(event, h11.ConnectionClosed):
                raise ProxyProtocolError(
                    f"proxy {self.proxy.where} closed the connection without an answer"
                )
            raise ProxyProtocolError(f"proxy {self.proxy.where} sent an unexpected answer")
