"""Shared pieces of the SMTP front-end tests: a real mailgate with SMTP listeners in front of the
lab's submission server (Dovecot relaying to the sink), and a raw SMTP client. (No tests here.)

The account is seeded once per session (:func:`smtp_seeded`, about a second of KDF work) and its
state directory copied for every test. The sink is shared by the session's tests: each test
sends to recipients of its own (:func:`new_rcpt`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import smtplib
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.config import Config
from gateway.protocol import sasl
from gateway.server import GatewayServer
from tests.helpers_gateway import client_ssl_context, lab_provider, make_config, start_gateway
from tests.lab import LabDovecot, LabOAuthServer
from tests.lab.smtp_sink import SinkMessage
from tests.test_imap_support import SeededState, seed_account
from tests.wire import LineWire

USER = "alice"
PASSWORD = "smtp-local-pass-1"
ALIAS = "alias@example.org"
#: The listeners of every SMTP gate, in this order (server.addresses has the same order).
LISTENERS = ("smtps", "submission", "plain", "relay", "elsewhere")

_rcpt_counter = itertools.count(1)


def new_rcpt(prefix: str = "rcpt") -> str:
    """A recipient no other test of this session uses (the sink is shared)."""
    return f"{prefix}{next(_rcpt_counter)}-{os.getpid()}@example.net"


def smtp_listeners(relay_user: str = USER) -> list[dict[str, Any]]:
    return [
        {"protocol": "smtp", "bind": "127.0.0.1:0", "tls": "implicit"},
        {"protocol": "smtp", "bind": "127.0.0.1:0", "tls": "starttls"},
        {"protocol": "smtp", "bind": "127.0.0.1:0", "tls": "none", "plaintext_auth_from": ["127.0.0.0/8"]},
        # Loopback is a relay network here: devices send without AUTH, as relay_user.
        {"protocol": "smtp", "bind": "127.0.0.1:0", "tls": "none", "relay_from": ["127.0.0.0/8"],
         "relay_user": relay_user},
        # A relay listener whose networks do not include loopback: the tests come from outside.
        {"protocol": "smtp", "bind": "127.0.0.1:0", "tls": "starttls", "relay_from": ["192.0.2.0/24"],
         "relay_user": relay_user},
    ]


def smtp_config(tmp_path: Path, lab: LabDovecot, oauth: LabOAuthServer, upstream_user: str, *,
                smtp: str | None = None, ca_file: Path | None = None, smtp_tls: str = "implicit",
                extra_users: dict[str, Any] | None = None, **limits: Any) -> Config:
    port = lab.ports["submissions" if smtp_tls == "implicit" else "submission"]
    provider = {**lab_provider(lab, oauth, ca_file=ca_file), "smtp": smtp or f"{lab.host}:{port}",
                "smtp_tls": smtp_tls}
    raw = {
        "server": {"hostname": "localhost", "state_dir": "state"},
        "listener": smtp_listeners(),
        "admin": {"enabled": False},
        "providers": {"lab": provider},
        "users": {USER: {"provider": "lab", "upstream_user": upstream_user, "send_as": [ALIAS]},
                  **(extra_users or {})},
        "limits": {"auth_failure_delay": 0, "token_request_timeout": 5, "upstream_connect_timeout": 5,
                   "upstream_command_timeout": 10, **limits},
    }
    return make_config(tmp_path, raw)


@pytest.fixture(scope="session")
def smtp_seeded(tmp_path_factory: pytest.TempPathFactory, lab: LabDovecot,
                oauth_server: LabOAuthServer) -> SeededState:
    base = tmp_path_factory.mktemp("smtp-seeded")
    upstream_user = lab.new_user("smtp")
    config = smtp_config(base, lab, oauth_server, upstream_user)
    _, refresh_token = oauth_server.issue_tokens(upstream_user)
    trio.run(seed_account, config, refresh_token, PASSWORD)
    return SeededState(config.server.state_dir, upstream_user, refresh_token)


@dataclass
class SmtpGate:
    config: Config
    server: GatewayServer
    lab: LabDovecot
    oauth: LabOAuthServer
    upstream_user: str
    user: str = USER
    password: str = PASSWORD
    ssl_context: ssl.SSLContext = field(init=False)

    def __post_init__(self) -> None:
        self.ssl_context = client_ssl_context(self.config)

    def address(self, listener: str) -> tuple[str, int]:
        return self.server.addresses[LISTENERS.index(listener)]

    def port(self, listener: str) -> int:
        return self.address(listener)[1]

    async def wire(self, listener: str = "smtps", *, greeting: bool = True) -> SmtpWire:
        host, port = self.address(listener)
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if listener == "smtps":
            stream = trio.SSLStream(stream, self.ssl_context, server_hostname="localhost")
        wire = SmtpWire(stream, self.ssl_context)
        if greeting:
            code, _ = await wire.reply()
            assert code == 220
        return wire

    async def login(self, listener: str = "smtps") -> SmtpWire:
        wire = await self.wire(listener)
        code, _ = await wire.command("EHLO test.example")
        assert code == 250
        if listener in ("submission", "elsewhere"):
            assert (await wire.command("STARTTLS"))[0] == 220
            await wire.start_tls()
            assert (await wire.command("EHLO test.example"))[0] == 250
        code, lines = await wire.command("AUTH PLAIN " + plain(self.user, self.password))
        assert code == 235, lines
        return wire

    def smtplib(self, listener: str = "smtps") -> smtplib.SMTP:
        host, port = self.address(listener)
        if listener == "smtps":
            return smtplib.SMTP_SSL("localhost", port, context=self.ssl_context, timeout=20)
        client = smtplib.SMTP("localhost", port, timeout=20)
        return client

    async def received(self, rcpt: str, count: int = 1) -> list[SinkMessage]:
        assert self.lab.sink is not None
        return await trio.to_thread.run_sync(self.lab.sink.wait_for, rcpt, count)

    def sink_count(self, rcpt: str) -> int:
        assert self.lab.sink is not None
        return len(self.lab.sink.for_recipient(rcpt))


def plain(user: str, password: str) -> str:
    return sasl.b64encode(f"\0{user}\0{password}".encode()).decode()


class SmtpWire(LineWire):
    """A raw SMTP client for byte-exact tests."""

    async def reply(self) -> tuple[int, list[bytes]]:
        lines = []
        while True:
            line = await self.line()
            if not line:
                raise EOFError("connection closed; lines so far: " + repr(lines))
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), lines

    async def command(self, cmd: str | bytes) -> tuple[int, list[bytes]]:
        await self.send((cmd.encode() if isinstance(cmd, str) else cmd) + b"\r\n")
        return await self.reply()


def strip_trace(data: bytes) -> bytes:
    """A message as the sink stored it, without the ``Received:`` header Dovecot puts on top."""
    assert data.startswith(b"Received: "), data[:200]
    lines = data.split(b"\r\n")
    i = 1
    while lines[i].startswith((b"\t", b" ")):
        i += 1
    return b"\r\n".join(lines[i:])


async def start_smtp_gate(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth: LabOAuthServer,
                          seeded: SeededState, **options: Any) -> SmtpGate:
    config = smtp_config(tmp_path, lab, oauth, seeded.upstream_user, **options)
    shutil.copytree(seeded.state_dir, config.server.state_dir)
    server = await start_gateway(nursery, config)
    return SmtpGate(config=config, server=server, lab=lab, oauth=oauth, upstream_user=seeded.upstream_user)


@pytest.fixture
async def smtp_gate(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
                    smtp_seeded: SeededState) -> SmtpGate:
    return await start_smtp_gate(nursery, tmp_path, lab, oauth_server, smtp_seeded)
