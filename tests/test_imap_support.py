"""Shared pieces of the IMAP front-end tests: a real mailgate in front of the lab Dovecot.

(No tests here; the ``test_imap_*`` end-to-end modules import these helpers and fixtures.)

The ``gate`` fixture builds a config whose provider is the lab Dovecot (IMAPS, verified against
the lab CA, XOAUTH2 tokens from the lab OAuth server), seeds the account the way an admin does
(``mailgate authorize --refresh-token-stdin``), and starts the real gateway in the test's
nursery with three IMAP listeners: implicit TLS, STARTTLS, and cleartext allowed from loopback.
"""

from __future__ import annotations

import imaplib
import itertools
import shutil
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.config import Config
from gateway.oauth import commands
from gateway.server import GatewayServer
from tests.helpers_gateway import (
    client_ssl_context,
    lab_provider,
    loopback_listeners,
    make_config,
    start_gateway,
)
from tests.lab import LabDovecot, LabOAuthServer
from tests.test_oauth_support import Terminal
from tests.wire import IO_TIMEOUT, LineWire

PASSWORD = 'local "pass" \\word 1'
USER = "alice"


@dataclass
class Gate:
    """A running mailgate in front of the lab, with one seeded account."""

    config: Config
    server: GatewayServer
    lab: LabDovecot
    oauth: LabOAuthServer
    upstream_user: str
    refresh_token: str
    user: str = USER
    password: str = PASSWORD
    mailbox: str = "INBOX"
    ssl_context: ssl.SSLContext = field(init=False)

    def __post_init__(self) -> None:
        self.ssl_context = client_ssl_context(self.config)

    @property
    def imaps(self) -> tuple[str, int]:
        return self.server.addresses[0]

    @property
    def starttls(self) -> tuple[str, int]:
        return self.server.addresses[1]

    @property
    def plain(self) -> tuple[str, int]:
        return self.server.addresses[2]

    def imaplib(self, *, login: bool = True) -> imaplib.IMAP4_SSL:
        """A blocking imaplib client on the implicit-TLS listener (use it in a thread)."""
        host, port = self.imaps
        client = imaplib.IMAP4_SSL("localhost", port, ssl_context=self.ssl_context, timeout=IO_TIMEOUT)
        if login:
            client.login(self.user, self.password)
        return client

    async def wire(self, listener: str = "imaps") -> "Wire":
        host, port = getattr(self, listener)
        tcp = await trio.open_tcp_stream(host, port)
        stream: trio.abc.Stream = tcp
        if listener == "imaps":
            stream = trio.SSLStream(tcp, self.ssl_context, server_hostname="localhost")
        return Wire(stream, self.ssl_context)


class Wire(LineWire):
    """A raw IMAP client for byte-exact tests: send bytes, read lines and exact counts."""

    async def until_tagged(self, tag: bytes) -> list[bytes]:
        """Lines up to and including the tagged response ``tag`` (literals inline)."""
        lines = []
        while True:
            line = await self.line()
            if not line:
                raise EOFError(f"stream ended before {tag!r}: {lines!r}")
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    async def command(self, cmd: bytes) -> list[bytes]:
        tag = cmd.split(b" ", 1)[0]
        await self.send(cmd + b"\r\n")
        return await self.until_tagged(tag)


def gate_config(tmp_path: Path, lab: LabDovecot, oauth: LabOAuthServer, upstream_user: str,
                **limits: Any) -> Config:
    raw = {
        "server": {"hostname": "localhost", "state_dir": "state"},
        "listener": loopback_listeners("imap"),
        "admin": {"enabled": False},
        "providers": {"lab": lab_provider(lab, oauth)},
        "users": {USER: {"provider": "lab", "upstream_user": upstream_user}},
        "limits": {"auth_failure_delay": 0, "token_request_timeout": 5, "upstream_connect_timeout": 5,
                   **limits},
    }
    return make_config(tmp_path, raw)


async def seed_account(config: Config, refresh_token: str, password: str = PASSWORD) -> None:
    out = Terminal()
    status = await commands.authorize_async(
        config, USER, refresh_token_stdin=True, password_stdin=True,
        stdin=Terminal(f"{password}\n{refresh_token}\n"), stdout=out,
    )
    assert status == 0, out.getvalue()


async def start_gate(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth: LabOAuthServer,
                     upstream_user: str, **limits: Any) -> Gate:
    config = gate_config(tmp_path, lab, oauth, upstream_user, **limits)
    _, refresh_token = oauth.issue_tokens(upstream_user)
    await seed_account(config, refresh_token)
    server = await start_gateway(nursery, config)
    return Gate(config=config, server=server, lab=lab, oauth=oauth, upstream_user=upstream_user,
                refresh_token=refresh_token)


@dataclass(frozen=True)
class SeededState:
    """A state directory with the account already authorized, to copy for each test."""

    state_dir: Path
    upstream_user: str
    refresh_token: str


@pytest.fixture(scope="session")
def seeded_state(tmp_path_factory: pytest.TempPathFactory, lab: LabDovecot,
                 oauth_server: LabOAuthServer) -> SeededState:
    """Seeding costs ~1 s of deliberate KDF work: do it once per session, copy it per test.

    Tests sharing this account work in mailboxes of their own (``Gate.mailbox``).
    """
    base = tmp_path_factory.mktemp("imap-seeded")
    upstream_user = lab.new_user("imap")
    config = gate_config(base, lab, oauth_server, upstream_user)
    _, refresh_token = oauth_server.issue_tokens(upstream_user)
    trio.run(seed_account, config, refresh_token)
    return SeededState(config.server.state_dir, upstream_user, refresh_token)


_mailbox_counter = itertools.count(1)


async def start_seeded_gate(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                            oauth: LabOAuthServer, seeded: SeededState, **limits: Any) -> Gate:
    """A gateway on the session's seeded account; ``gate.mailbox`` is this test's own."""
    config = gate_config(tmp_path, lab, oauth, seeded.upstream_user, **limits)
    shutil.copytree(seeded.state_dir, config.server.state_dir)
    server = await start_gateway(nursery, config)
    g = Gate(config=config, server=server, lab=lab, oauth=oauth,
             upstream_user=seeded.upstream_user, refresh_token=seeded.refresh_token)
    g.mailbox = f"test{next(_mailbox_counter)}"
    return g


@pytest.fixture
async def gate(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
               seeded_state: SeededState) -> Gate:
    return await start_seeded_gate(nursery, tmp_path, lab, oauth_server, seeded_state)


@pytest.fixture
async def own_gate(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                   oauth_server: LabOAuthServer, lab_user: str) -> Gate:
    """A gateway whose account (and upstream mailbox) is this test's alone (seeding: ~1 s)."""
    return await start_gate(nursery, tmp_path, lab, oauth_server, lab_user)


def caps_of(line: bytes) -> set[str]:
    """The capability atoms of a ``* CAPABILITY`` line or a ``[CAPABILITY ...]`` code."""
    text = line.decode()
    if "[CAPABILITY " in text:
        text = text.split("[CAPABILITY ", 1)[1].split("]", 1)[0]
    else:
        text = text.split("CAPABILITY", 1)[1]
    return set(text.split())
