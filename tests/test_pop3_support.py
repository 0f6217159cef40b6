"""Shared pieces of the POP3 front-end tests: a real mailgate with POP3 listeners in front of
the lab Dovecot, and a raw POP3 client. (No tests here.)

Seeding an account costs about a second of deliberate KDF work, so it is done once per
session (:func:`pop3_seeded`) and its state directory copied for every test. Tests that
share that upstream account each get a mailbox of their own (``PopGate.mailbox``, set as the
user's ``pop3_mailbox``); tests that compare with Dovecot's own POP3 server need mail in
INBOX and use a fresh upstream user (``inbox_gate``).
"""

from __future__ import annotations

import itertools
import shutil
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from gateway.config import Config
from gateway.server import GatewayServer
from tests.helpers_gateway import (
    client_ssl_context,
    lab_provider,
    loopback_listeners,
    make_config,
    start_gateway,
)
from tests.faults.proxy import FaultProxy
from tests.lab import LabDovecot, LabOAuthServer
from tests.lab import seed
from tests.test_imap_support import PASSWORD, USER, SeededState, seed_account
from tests.wire import IO_TIMEOUT, LineWire

LISTENERS = ("pop3s", "stls", "plain")


@dataclass
class PopGate:
    config: Config
    server: GatewayServer
    lab: LabDovecot
    oauth: LabOAuthServer
    upstream_user: str
    mailbox: str
    user: str = USER
    password: str = PASSWORD
    ssl_context: ssl.SSLContext = field(init=False)

    def __post_init__(self) -> None:
        self.ssl_context = client_ssl_context(self.config)

    def address(self, listener: str) -> tuple[str, int]:
        return self.server.addresses[LISTENERS.index(listener)]

    @property
    def port(self) -> int:
        return self.address("pop3s")[1]

    async def wire(self, listener: str = "pop3s", *, greeting: bool = True) -> PopWire:
        host, port = self.address(listener)
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if listener == "pop3s":
            stream = trio.SSLStream(stream, self.ssl_context, server_hostname="localhost")
        wire = PopWire(stream, self.ssl_context)
        if greeting:
            assert (await wire.line()).startswith(b"+OK")
        return wire

    async def login(self, listener: str = "pop3s") -> PopWire:
        wire = await self.wire(listener)
        assert await wire.command(f"USER {self.user}") == b"+OK\r\n"
        status = await wire.command(f"PASS {self.password}")
        assert status.startswith(b"+OK Logged in"), status
        return wire

    # -- the upstream mailbox, directly (blocking helpers run in a thread)

    async def append(self, raw: bytes, flags: tuple[str, ...] = ()) -> int:
        return await trio.to_thread.run_sync(
            lambda: seed.append(self.lab, self.upstream_user, raw, self.mailbox, flags)
        )

    async def uids(self, mailbox: str | None = None) -> list[int]:
        return await trio.to_thread.run_sync(
            seed.list_uids, self.lab, self.upstream_user, mailbox or self.mailbox
        )

    async def flags(self, uid: int) -> set[str]:
        return await trio.to_thread.run_sync(seed.flags, self.lab, self.upstream_user, uid, self.mailbox)


class PopWire(LineWire):
    """A raw POP3 client for byte-exact tests."""

    async def command(self, cmd: str | bytes) -> bytes:
        await self.send((cmd.encode() if isinstance(cmd, str) else cmd) + b"\r\n")
        return await self.line()

    async def body(self) -> bytes:
        """The rest of a multi-line answer up to and including ``.\\r\\n`` (the raw wire)."""
        lines = []
        while True:
            line = await self.line()
            if not line:
                raise EOFError("connection ended before the end of the multi-line answer: "
                               + repr(b"".join(lines)[-200:]))
            lines.append(line)
            if line == b".\r\n":
                return b"".join(lines)

    async def multiline(self, cmd: str) -> tuple[bytes, bytes]:
        status = await self.command(cmd)
        assert status.startswith(b"+OK"), status
        return status, await self.body()

    async def listing(self, cmd: str) -> list[tuple[int, str]]:
        _, wire = await self.multiline(cmd)
        return [(int(n), v) for n, v in (line.decode().split() for line in seed.unstuff(wire).splitlines())]


def pop_config(tmp_path: Path, lab: LabDovecot, oauth: LabOAuthServer, upstream_user: str, *,
               mailbox: str = "INBOX", delete: str = "expunge", imap: str | None = None,
               ca_file: Path | None = None, extra_listeners: tuple[dict[str, Any], ...] = (),
               **limits: Any) -> Config:
    """``extra_listeners`` come after the three of :data:`LISTENERS` (``server.addresses[3:]``)."""
    raw = {
        "server": {"hostname": "localhost", "state_dir": "state"},
        "listener": loopback_listeners("pop3") + list(extra_listeners),
        "admin": {"enabled": False},
        "providers": {"lab": lab_provider(lab, oauth, imap=imap, ca_file=ca_file)},
        "users": {USER: {"provider": "lab", "upstream_user": upstream_user,
                         "pop3_mailbox": mailbox, "pop3_delete": delete}},
        "limits": {"auth_failure_delay": 0, "token_request_timeout": 5, "upstream_connect_timeout": 5,
                   "upstream_command_timeout": 10, **limits},
    }
    return make_config(tmp_path, raw)


@pytest.fixture(scope="session")
def pop3_seeded(tmp_path_factory: pytest.TempPathFactory, lab: LabDovecot,
                oauth_server: LabOAuthServer) -> SeededState:
    base = tmp_path_factory.mktemp("pop3-seeded")
    upstream_user = lab.new_user("pop")
    config = pop_config(base, lab, oauth_server, upstream_user)
    _, refresh_token = oauth_server.issue_tokens(upstream_user)
    trio.run(seed_account, config, refresh_token)
    return SeededState(config.server.state_dir, upstream_user, refresh_token)


_mailbox_counter = itertools.count(1)


def _create_mailbox(lab: LabDovecot, user: str, mailbox: str) -> None:
    with seed.imap_session(lab, user) as imap:
        imap.command(b'CREATE "' + mailbox.encode() + b'"')


async def start_pop_gate(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth: LabOAuthServer,
                         seeded: SeededState, *, mailbox: str | None = None, **options: Any) -> PopGate:
    """A gateway on the seeded account whose ``pop3_mailbox`` is a fresh mailbox of its own."""
    if mailbox is None:
        mailbox = f"pop{next(_mailbox_counter)}"
        await trio.to_thread.run_sync(_create_mailbox, lab, seeded.upstream_user, mailbox)
    config = pop_config(tmp_path, lab, oauth, seeded.upstream_user, mailbox=mailbox, **options)
    shutil.copytree(seeded.state_dir, config.server.state_dir)
    server = await start_gateway(nursery, config)
    return PopGate(config=config, server=server, lab=lab, oauth=oauth,
                   upstream_user=seeded.upstream_user, mailbox=mailbox)


async def start_inbox_gate(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth: LabOAuthServer,
                           upstream_user: str, **options: Any) -> PopGate:
    """A gateway on a fresh upstream user's INBOX (seeding costs ~1 s)."""
    config = pop_config(tmp_path, lab, oauth, upstream_user, **options)
    _, refresh_token = oauth.issue_tokens(upstream_user)
    await seed_account(config, refresh_token)
    server = await start_gateway(nursery, config)
    return PopGate(config=config, server=server, lab=lab, oauth=oauth,
                   upstream_user=upstream_user, mailbox="INBOX")


async def start_proxied_gate(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                             oauth: LabOAuthServer, seeded: SeededState,
                             **options: Any) -> tuple[PopGate, FaultProxy]:
    """A gateway whose upstream IMAP goes through a TLS-terminating :class:`FaultProxy`."""
    ca = trustme.CA()
    ca_file = tmp_path / "proxy-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_tls)
    client_tls = ssl.create_default_context(cafile=str(lab.ca_file))
    proxy = FaultProxy((lab.host, lab.ports["imaps"]), server_tls=server_tls, client_tls=client_tls,
                       server_hostname="localhost")
    await nursery.start(proxy.run)
    gate = await start_pop_gate(nursery, tmp_path, lab, oauth, seeded, imap=proxy.address,
                                ca_file=ca_file, **options)
    return gate, proxy


@pytest.fixture
async def pop_gate(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
                   pop3_seeded: SeededState) -> PopGate:
    return await start_pop_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded)
