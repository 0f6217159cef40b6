"""The fault suite's rig: one real mailgate (IMAP and POP3 listeners) whose upstream IMAP and
identity-provider traffic both pass through a :class:`~tests.faults.proxy.FaultProxy`.

::

    client ──▶ mailgate ──(TLS)──▶ imap_proxy ──(TLS)──▶ lab Dovecot
                  └──(HTTP)──▶ idp_proxy ──▶ lab OAuth server

The account is the session's seeded one (``seeded_state`` of the IMAP tests: seeding costs a
second of deliberate KDF work); each test works in a mailbox of its own (``rig.mailbox``), which
POP3 also uses as its maildrop. After every fault a test checks, with a direct Dovecot session
(:mod:`tests.lab.seed`), that the mailbox is exactly what the protocol says it must be, and with
:meth:`Rig.settled` that the gateway let go of everything: no client session, no upstream slot,
no upstream connection left open.
"""

from __future__ import annotations

import itertools
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trustme

from gateway.config import Config
from gateway.server import GatewayServer
from tests.faults.proxy import FaultProxy
from tests.fixtures.gateway import loopback_listeners, make_config, start_gateway
from tests.fixtures.imap import PASSWORD, USER, Gate, SeededState
from tests.fixtures.pop3 import PopGate
from tests.lab import LabDovecot, LabOAuthServer, seed

#: Timeouts of the rig's gateway: short, so that deadlines fire within a test.
FAST_LIMITS: dict[str, Any] = {
    "auth_failure_delay": 0,
    "token_request_timeout": 2,
    "upstream_connect_timeout": 3,
    "upstream_command_timeout": 2,
    "login_timeout": 10,  # longer than the upstream deadlines, as with the defaults (180 vs 30)
    "tls_handshake_timeout": 2,
    "upstream_slot_wait": 1,
}
#: How long a test waits for the gateway to let go of a broken session.
SETTLE_TIMEOUT = 15.0
IMAP_LISTENERS = ("imaps", "starttls", "plain")
POP3_LISTENERS = ("pop3s", "stls", "plain")

_mailboxes = itertools.count(1)


def proxy_tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """The certificate the IMAP proxy shows mailgate, and the CA file mailgate must trust."""
    ca = trustme.CA()
    ca_file = tmp_path / "fault-proxy-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_tls)
    return server_tls, ca_file


def rig_config(tmp_path: Path, *, imap: str, ca_file: Path, token_url: str, oauth: LabOAuthServer,
               upstream_user: str, mailbox: str, **limits: Any) -> Config:
    listeners = loopback_listeners("imap") + loopback_listeners("pop3")
    raw = {
        "server": {"hostname": "localhost", "state_dir": "state"},
        "listener": listeners,
        "admin": {"enabled": False},
        "providers": {
            "lab": {
                "imap": imap, "imap_tls": "implicit", "ca_file": str(ca_file), "sasl": "xoauth2",
                "flow": "authorization_code", "authorize_url": oauth.authorize_url,
                "token_url": token_url, "scopes": ["mail"], "client_id": oauth.client_id,
                "client_secret": oauth.client_secret,
            }
        },
        "users": {USER: {"provider": "lab", "upstream_user": upstream_user,
                         "pop3_mailbox": mailbox, "pop3_delete": "expunge"}},
        "limits": {**FAST_LIMITS, **limits},
    }
    return make_config(tmp_path, raw)


class RigPop(PopGate):
    """PopGate on the rig's POP3 listeners (which come after the three IMAP ones)."""

    def address(self, listener: str) -> tuple[str, int]:
        return self.server.addresses[len(IMAP_LISTENERS) + POP3_LISTENERS.index(listener)]


@dataclass
class Rig:
    config: Config
    server: GatewayServer
    lab: LabDovecot
    oauth: LabOAuthServer
    imap_proxy: FaultProxy
    idp_proxy: FaultProxy
    upstream_user: str
    mailbox: str
    imap: Gate
    pop: RigPop

    # -- the mailbox, through a direct Dovecot session (blocking helpers, run in a thread)

    async def append(self, raw: bytes) -> int:
        return await trio.to_thread.run_sync(
            lambda: seed.append(self.lab, self.upstream_user, raw, self.mailbox)
        )

    async def uids(self) -> list[int]:
        return await trio.to_thread.run_sync(seed.list_uids, self.lab, self.upstream_user,
                                             self.mailbox)

    async def flags(self, uid: int) -> set[str]:
        return await trio.to_thread.run_sync(seed.flags, self.lab, self.upstream_user, uid,
                                             self.mailbox)

    async def raw(self, uid: int) -> bytes:
        return await trio.to_thread.run_sync(seed.fetch_raw, self.lab, self.upstream_user, uid,
                                             self.mailbox)

    # -- the gateway's resources

    def slots_in_use(self) -> int:
        return self.server.ctx.connector.slots(USER).in_use  # type: ignore[attr-defined]

    def pooled(self) -> int:
        """Idle upstream connections kept in the pool (each holds a slot and a connection)."""
        return self.server.ctx.connector.pool.idle_count(USER)  # type: ignore[attr-defined]

    async def settled(self, *others: GatewayServer) -> None:
        """Wait until no client session is left, and no upstream slot or upstream connection
        but those of the pool. ``others``: more gateways a test started on the same upstream
        proxy (their sessions and pooled connections count too)."""
        def pooled(server: GatewayServer) -> int:
            return server.ctx.connector.pool.idle_count(USER)  # type: ignore[attr-defined]

        with trio.fail_after(SETTLE_TIMEOUT):
            while (self.server.active or self.server.sessions
                   or any(o.active or o.sessions for o in others)
                   or self.slots_in_use() != self.pooled()
                   or self.imap_proxy.open_connections
                   != self.pooled() + sum(pooled(o) for o in others)):
                await trio.sleep(0.02)

    async def still_serves(self) -> None:
        """A new POP3 and a new IMAP session both work (the fault did not break the gateway)."""
        self.imap_proxy.disarm()
        self.idp_proxy.disarm()
        w = await self.pop.login()
        assert (await w.command("STAT")).startswith(b"+OK ")
        assert await w.command("QUIT") == b"+OK Logging out.\r\n"
        await w.eof()
        wire = await self.imap.wire()
        assert (await wire.line()).startswith(b"* OK")
        lines = await wire.command(b"a LOGIN alice " + _quoted(PASSWORD))
        assert lines[-1].startswith(b"a OK "), lines
        lines = await wire.command(b'b EXAMINE "' + self.mailbox.encode() + b'"')
        assert lines[-1].startswith(b"b OK "), lines
        await wire.command(b"c LOGOUT")
        await wire.eof()
        await self.settled()


def _quoted(text: str) -> bytes:
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'


def _create_mailbox(lab: LabDovecot, user: str, mailbox: str) -> None:
    with seed.imap_session(lab, user) as imap:
        imap.command(b'CREATE "' + mailbox.encode() + b'"')


async def start_rig(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth: LabOAuthServer,
                    seeded: SeededState, **limits: Any) -> Rig:
    server_tls, ca_file = proxy_tls(tmp_path)
    imap_proxy = FaultProxy((lab.host, lab.ports["imaps"]), server_tls=server_tls,
                            client_tls=ssl.create_default_context(cafile=str(lab.ca_file)),
                            server_hostname="localhost")
    idp_proxy = FaultProxy(("127.0.0.1", oauth.port))
    await nursery.start(imap_proxy.run)
    await nursery.start(idp_proxy.run)
    mailbox = f"fault{next(_mailboxes)}"
    await trio.to_thread.run_sync(_create_mailbox, lab, seeded.upstream_user, mailbox)
    config = rig_config(
        tmp_path, imap=imap_proxy.address, ca_file=ca_file,
        token_url=f"http://{idp_proxy.address}/token", oauth=oauth,
        upstream_user=seeded.upstream_user, mailbox=mailbox, **limits,
    )
    shutil.copytree(seeded.state_dir, config.server.state_dir)
    server = await start_gateway(nursery, config)
    imap = Gate(config=config, server=server, lab=lab, oauth=oauth,
                upstream_user=seeded.upstream_user, refresh_token=seeded.refresh_token,
                mailbox=mailbox)
    pop = RigPop(config=config, server=server, lab=lab, oauth=oauth,
                 upstream_user=seeded.upstream_user, mailbox=mailbox)
    return Rig(config=config, server=server, lab=lab, oauth=oauth, imap_proxy=imap_proxy,
               idp_proxy=idp_proxy, upstream_user=seeded.upstream_user, mailbox=mailbox,
               imap=imap, pop=pop)
