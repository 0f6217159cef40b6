"""The seams of gateway/ports.py: front ends driven through fakes, and the real classes checked
against the protocols by mypy.

The front-end tests run a whole IMAP or POP3 session over an in-memory stream pair, with fakes
behind ``Accounts`` and ``UpstreamConnector``: no socket, no lab, no identity provider. They
show that the front ends use only what the protocols name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

from gateway import ports
from gateway.config import Config, ListenerConfig, ProviderConfig, UserConfig, parse_config
from gateway.context import GatewayContext
from gateway.errors import AuthenticationFailed, TemporaryFailure
from gateway.events import EventBus
from gateway.frontends.imap_session import handle_imap
from gateway.frontends.pop3_session import handle_pop3
from gateway.net import ClientStream
from gateway.oauth.accounts import Account, AccountManager
from gateway.oauth.store import StateStore
from gateway.upstream.client import UpstreamIMAP
from gateway.upstream.connector import UpstreamConnector
from gateway.upstream.smtp_connector import SmtpConnector

T = TypeVar("T")
PASSWORD = "the right password"
PEER = ("127.0.0.1", 40000)


def _config(tmp_path: Path) -> Config:
    return parse_config({
        "server": {"state_dir": "state"},
        "providers": {"up": {"imap": "127.0.0.1:993", "token_url": "http://127.0.0.1:9/token",
                             "authorize_url": "http://127.0.0.1:9/authorize",
                             "client_id": "cid"}},
        "users": {"alice": {"provider": "up", "upstream_user": "alice@example.com"}},
    }, base_dir=tmp_path)


class FakeAccount:
    def __init__(self, config: Config) -> None:
        self.name = "alice"
        self.user: UserConfig = config.users["alice"]
        self.upstream_user = self.user.upstream_user
        self.provider: ProviderConfig = config.provider_for(self.user)

    async def access_token(self, *, force_refresh: bool = False) -> str:
        return "never-used-token"


class FakeKdf:
    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return fn(*args)


class FakeAccounts:
    """Logs in ``alice`` with :data:`PASSWORD`; anything else fails like a wrong password."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.kdf = FakeKdf()

    async def login(self, username: str, password: str, *,
                    peer: str | None = None) -> ports.LocalAccount:
        if (username, password) != ("alice", PASSWORD):
            raise AuthenticationFailed("authentication failed")
        return FakeAccount(self.config)

    def view(self, name: str) -> ports.AccountView | None:
        return None

    def account(self, name: str) -> ports.LocalAccount:
        if name != "alice":
            raise KeyError(name)
        return FakeAccount(self.config)

    def update_config(self, config: Config) -> None:
        self.config = config


class UnavailableConnector:
    """An upstream that is down: every open raises TemporaryFailure, and is recorded."""

    def __init__(self) -> None:
        self.opened: list[str] = []

    async def open(
        self, account: ports.TokenSource, *, accept: frozenset[str] = frozenset()
    ) -> UpstreamIMAP:
        self.opened.append(account.upstream_user)
        raise TemporaryFailure("the provider is down")

    async def release(self, conn: UpstreamIMAP, *, clean: bool) -> None:
        raise AssertionError("nothing was opened, nothing can be released")

    async def maintain(self) -> None:
        await trio.sleep_forever()

    def update_config(self, config: Config) -> None:
        pass


def _context(tmp_path: Path, connector: ports.UpstreamConnector) -> GatewayContext:
    config = _config(tmp_path)
    return GatewayContext(config=config, accounts=FakeAccounts(config), events=EventBus(),
                          connector=connector, store=StateStore(config.server.state_dir))


class Client:
    """The client's end of the in-memory connection: lines out, lines in."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def line(self) -> bytes:
        with trio.fail_after(5):
            while b"\r\n" not in self.buffer:
                data = await self.stream.receive_some()
                assert data, f"connection closed; unanswered: {self.buffer!r}"
                self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    async def send(self, line: str) -> bytes:
        await self.stream.send_all(line.encode() + b"\r\n")
        return await self.line()


async def _session(protocol: str, tmp_path: Path, connector: ports.UpstreamConnector,
                   dialogue: Callable[[Client], Any]) -> GatewayContext:
    ctx = _context(tmp_path, connector)
    client_end, server_end = trio.testing.memory_stream_pair()
    listener = ListenerConfig.model_validate({"protocol": protocol, "bind": "127.0.0.1:0",
                                              "tls": "none", "plaintext_auth_from": ["127.0.0.0/8"]})
    stream = ClientStream(server_end, peer=PEER, listener=listener, ssl_context=None,
                          handshake_timeout=5)
    handler = handle_pop3 if protocol == "pop3" else handle_imap
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler, stream, ctx)
        await dialogue(Client(client_end))
        await client_end.aclose()
    return ctx


async def test_pop3_login_with_the_upstream_down_is_a_temporary_error(tmp_path: Path) -> None:
    connector = UnavailableConnector()

    async def dialogue(client: Client) -> None:
        assert (await client.line()).startswith(b"+OK")
        assert (await client.send("USER alice")).startswith(b"+OK")
        assert await client.send(f"PASS {PASSWORD}") == (
            b"-ERR [SYS/TEMP] Temporary failure, try again later."
        )
        # Still in AUTHORIZATION: a second try reaches the connector again.
        assert (await client.send("USER alice")).startswith(b"+OK")
        assert (await client.send(f"PASS {PASSWORD}")).startswith(b"-ERR [SYS/TEMP]")

    ctx = await _session("pop3", tmp_path, connector, dialogue)
    assert connector.opened == ["alice@example.com", "alice@example.com"]
    failures = [e for e in ctx.events.recent if e["type"] == "login.failed"]
    assert [e["reason"] for e in failures] == ["temporary", "temporary"]
    assert not any(e["type"] == "session.authenticated" for e in ctx.events.recent)


async def test_pop3_wrong_password_never_reaches_the_connector(tmp_path: Path) -> None:
    connector = UnavailableConnector()

    async def dialogue(client: Client) -> None:
        await client.line()
        await client.send("USER alice")
        assert (await client.send("PASS wrong")).startswith(b"-ERR [AUTH]")

    await _session("pop3", tmp_path, connector, dialogue)
    assert connector.opened == []


async def test_imap_login_with_the_upstream_down_is_a_temporary_no(tmp_path: Path) -> None:
    connector = UnavailableConnector()

    async def dialogue(client: Client) -> None:
        assert (await client.line()).startswith(b"* OK")
        answer = await client.send(f'a1 LOGIN alice "{PASSWORD}"')
        assert answer.startswith(b"a1 NO [UNAVAILABLE]")
        assert (await client.send("a2 LOGOUT")).startswith(b"* BYE")

    ctx = await _session("imap", tmp_path, connector, dialogue)
    assert connector.opened == ["alice@example.com"]
    assert [e["reason"] for e in ctx.events.recent if e["type"] == "login.failed"] == ["temporary"]


async def test_connector_keeps_slots_across_a_reload_unless_the_cap_changed(tmp_path: Path) -> None:
    config = _config(tmp_path)
    connector = UpstreamConnector(config)
    slots = connector.slots("alice")
    held = await slots.acquire()
    waits = config.model_copy(update={"limits": config.limits.model_copy(
        update={"upstream_slot_wait": 7.0})})
    connector.update_config(waits)
    assert connector.slots("alice") is slots and slots.wait == 7.0  # the held slot still counts
    capped = config.model_copy(update={"limits": config.limits.model_copy(
        update={"upstream_connections_per_account": 3})})
    connector.update_config(capped)
    fresh = connector.slots("alice")
    assert fresh is not slots and fresh.capacity == 3
    held.release()  # into the old cap, which nobody else uses any more
    assert slots.in_use == 0 and fresh.in_use == 0
    connector.update_config(capped.model_copy(update={"users": {}}))
    assert connector.slots("alice") is not fresh  # a removed user's cap is forgotten


# --- the real classes fit the protocols (checked by mypy, not at run time) -------------------


def _real_classes_fit(store: StateStore, manager: AccountManager, account: Account,
                      connector: UpstreamConnector, smtp: SmtpConnector) -> None:
    """Never called: mypy checks these assignments (see the test below)."""
    _store: ports.CredentialStore = store
    _accounts: ports.Accounts = manager
    _local: ports.LocalAccount = account
    _view: ports.AccountView = account
    _connector: ports.UpstreamConnector = connector
    _smtp: ports.SmtpConnector = smtp
    _fake_accounts: ports.Accounts = FakeAccounts(manager.config)
    _fake_connector: ports.UpstreamConnector = UnavailableConnector()


@pytest.mark.slow
def test_the_real_classes_and_the_fakes_satisfy_the_protocols(tmp_path: Path) -> None:
    mypy_api = pytest.importorskip("mypy.api")
    here = Path(__file__)
    out, err, status = mypy_api.run([
        "--strict", "--follow-imports=silent", "--no-incremental",
        f"--cache-dir={tmp_path / 'mypy'}", f"--python-executable={sys.executable}",
        str(here.parents[2] / "gateway" / "ports.py"), str(here),
    ])
    assert status == 0, out + err
