"""Helpers to run a real mailgate in-process in a test nursery (used by many test modules)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import trio

from gateway.app import build
from gateway.config import Config, parse_config
from gateway.server import GatewayServer


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mailgate.toml"
    path.write_text(text)
    return path


def make_config(tmp_path: Path, raw: dict[str, Any]) -> Config:
    """A config from a dict; relative paths resolve against tmp_path."""
    return parse_config(raw, base_dir=tmp_path, path=tmp_path / "mailgate.toml")


def loopback_listeners(protocol: str) -> list[dict[str, Any]]:
    """Three listeners on free loopback ports, in this order: implicit TLS, STARTTLS/STLS, and
    cleartext with password logins allowed from 127.0.0.0/8."""
    return [
        {"protocol": protocol, "bind": "127.0.0.1:0", "tls": "implicit"},
        {"protocol": protocol, "bind": "127.0.0.1:0", "tls": "starttls"},
        {"protocol": protocol, "bind": "127.0.0.1:0", "tls": "none",
         "plaintext_auth_from": ["127.0.0.0/8"]},
    ]


def lab_provider(lab: Any, oauth: Any, *, imap: str | None = None,
                 ca_file: Path | None = None) -> dict[str, Any]:
    """A ``[providers.lab]`` table for the test lab (Dovecot over IMAPS, the lab OAuth server);
    ``imap``/``ca_file`` point it elsewhere, e.g. at a fault-injecting proxy."""
    return {
        "imap": imap or f"{lab.host}:{lab.ports['imaps']}",
        "imap_tls": "implicit",
        "ca_file": str(ca_file or lab.ca_file),
        "sasl": "xoauth2",
        "flow": "authorization_code",
        "authorize_url": oauth.authorize_url,
        "token_url": oauth.token_url,
        "scopes": ["mail"],
        "client_id": oauth.client_id,
        "client_secret": oauth.client_secret,
    }


async def start_gateway(nursery: trio.Nursery, config: Config, **kwargs: Any) -> GatewayServer:
    """Build the real gateway (certificates, accounts, listeners) and start it in ``nursery``.

    Bind listeners to port 0; ``server.addresses[i]`` gives the bound (host, port) of each.
    """
    ctx, server = build(config)
    if kwargs.get("handlers"):
        server._handlers.update(kwargs["handlers"])
    await nursery.start(server.run)
    return server


def client_ssl_context(config: Config) -> ssl.SSLContext:
    """A client context trusting the gateway's generated CA, with strict X.509 checks."""
    ca_file = config.tls.cert_file.with_name("mailgate-ca.pem")
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx
