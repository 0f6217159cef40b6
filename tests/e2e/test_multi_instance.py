"""Several mailgate instances sharing one PostgreSQL store, behind a real HAProxy.

The account is authorized the way an admin does (``mailgate authorize`` into the SQLite file),
copied into PostgreSQL by ``migrate-store``, and served by two gateway instances (two complete
gateways, each with its own store connections, in this test's process) behind HAProxy
(``send-proxy-v2``, round robin). The lab OAuth server rotates refresh tokens: a refresh token
used twice would answer ``invalid_grant``.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.config import Config
from gateway.frontends.pop3_listing import Listings
from gateway.oauth.migrate import migrate_store
from gateway.oauth.pg_store import PgStore
from gateway.oauth.shared_token import ACCESS_TOKEN
from gateway.oauth.store import REFRESH_TOKEN, StateStore
from gateway.server import GatewayServer
from tests.fixtures.gateway import lab_provider, make_config, start_gateway
from tests.fixtures.imap import PASSWORD, USER, Wire, quoted, seed_account
from tests.fixtures.pop3 import PopWire
from tests.lab import LabDovecot, LabOAuthServer, seed
from tests.lab.corpus import big_message
from tests.lab.haproxy import Frontend, LabHAProxy
from tests.lab.postgres import LabPostgres


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def instance_config(base: Path, lab: LabDovecot, oauth: LabOAuthServer, upstream_user: str,
                    url: str | None) -> Config:
    raw: dict[str, Any] = {
        "server": {"hostname": "localhost", "state_dir": "state"},
        "listener": [{"protocol": "imap", "bind": "127.0.0.1:0", "tls": "none",
                      "plaintext_auth_from": ["127.0.0.0/8"],
                      "proxy_protocol_from": ["127.0.0.1/32"]}],
        "admin": {"enabled": False},
        "providers": {"lab": lab_provider(lab, oauth)},
        "users": {USER: {"provider": "lab", "upstream_user": upstream_user}},
        "limits": {"auth_failure_delay": 0, "token_request_timeout": 5,
                   "upstream_connect_timeout": 10, "upstream_connections_per_account": 60,
                   "store_timeout": 2},
    }
    if url is not None:
        raw["store"] = {"url": url}
    base.mkdir(parents=True, exist_ok=True)
    return make_config(base, raw)


@dataclass
class Cluster:
    servers: list[GatewayServer]
    haproxy: LabHAProxy
    url: str

    async def login(self) -> bytes:
        """One IMAP login through HAProxy; the tagged answer."""
        host, port = self.haproxy.address("imap")
        wire = Wire(await trio.open_tcp_stream(host, port), None)  # type: ignore[arg-type]
        try:
            greeting = await wire.line()
            if not greeting.startswith(b"* OK"):
                return greeting
            lines = await wire.command(b"a1 LOGIN " + quoted(USER) + b" " + quoted(PASSWORD))
            if lines[-1].startswith(b"a1 OK"):
                await wire.command(b"a2 LOGOUT")
            return b"".join(lines)
        finally:
            await wire.aclose()


@pytest.fixture
async def cluster(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                  oauth_server: LabOAuthServer, lab_user: str,
                  pg_url: str) -> AsyncIterator[Cluster]:
    # Authorize into SQLite, as with one instance; then move to PostgreSQL.
    single = instance_config(tmp_path / "single", lab, oauth_server, lab_user, pg_url)
    _, refresh_token = oauth_server.issue_tokens(lab_user)
    sqlite_only = instance_config(tmp_path / "single", lab, oauth_server, lab_user, None)
    await seed_account(sqlite_only, refresh_token)
    out = io.StringIO()
    assert await trio.to_thread.run_sync(migrate_store, single, out) == 0, out.getvalue()
    assert "copied 1 account(s)" in out.getvalue()
    servers = [await start_gateway(nursery, instance_config(tmp_path / f"gw{i}", lab,
                                                            oauth_server, lab_user, pg_url))
               for i in (1, 2)]
    haproxy = LabHAProxy([Frontend("imap", [s.addresses[0] for s in servers], send_proxy=2)])
    await trio.to_thread.run_sync(haproxy.start)
    try:
        yield Cluster(servers, haproxy, pg_url)
    finally:
        await trio.to_thread.run_sync(haproxy.stop)
        for server in servers:
            server.shutdown()
            await server.finished.wait()
            server.ctx.store.close()


def _toml_config(base: Path, lab: LabDovecot, oauth: LabOAuthServer, upstream_user: str,
                 url: str, pop3_port: int, admin_port: int) -> Path:
    lines = ["[server]", 'hostname = "localhost"', 'state_dir = "state"',
             "[store]", f"url = {json.dumps(url)}",
             "[admin]", f'bind = "127.0.0.1:{admin_port}"',
             "[limits]", "auth_failure_delay = 0", "token_request_timeout = 5",
             "[[listener]]", 'protocol = "pop3"', f'bind = "127.0.0.1:{pop3_port}"',
             'tls = "none"', 'plaintext_auth_from = ["127.0.0.0/8"]',
             'proxy_protocol_from = ["127.0.0.1/32"]',
             "[providers.lab]",
             *[f"{k} = {json.dumps(v)}" for k, v in lab_provider(lab, oauth).items()],
             f"[users.{USER}]", 'provider = "lab"', f"upstream_user = {json.dumps(upstream_user)}"]
    base.mkdir(parents=True, exist_ok=True)
    path = base / "mailgate.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def pop3_via(address: tuple[str, int], *, header: bool) -> tuple[PopWire, bytes]:
    """USER/PASS on a POP3 listener; ``header``: sent directly, with the PROXY header HAProxy
    would have sent."""
    wire = PopWire(await trio.open_tcp_stream(*address), None)  # type: ignore[arg-type]
    if header:
        await wire.send(b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 110\r\n")
    greeting = await wire.line()
    if not greeting.startswith(b"+OK"):
        return wire, b"greeting: " + greeting
    assert (await wire.command(f"USER {USER}")).startswith(b"+OK")
    return wire, await wire.command(f"PASS {PASSWORD}")


async def test_pop3_lock_across_instances_dies_with_a_killed_instance(
        nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
        lab_user: str, pg_url: str) -> None:
    config = instance_config(tmp_path / "seed", lab, oauth_server, lab_user, pg_url)
    _, refresh_token = oauth_server.issue_tokens(lab_user)
    await seed_account(instance_config(tmp_path / "seed", lab, oauth_server, lab_user, None),
                       refresh_token)
    assert await trio.to_thread.run_sync(migrate_store, config, io.StringIO()) == 0
    await trio.to_thread.run_sync(lambda: seed.append(lab, lab_user, big_message(3_000_000)))
    await trio.to_thread.run_sync(lambda: seed.append(lab, lab_user, big_message(1000, seed=1)))
    # Instance 1: a real `mailgate serve` process; instance 2: in this process.
    port1 = _free_port()
    path = _toml_config(tmp_path / "gw1", lab, oauth_server, lab_user, pg_url, port1,
                        _free_port())
    log = tmp_path / "gw1.log"
    with open(log, "wb") as out:
        first_instance = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(path), "serve"], stdout=out,
            stderr=subprocess.STDOUT)
    try:
        second = await start_gateway(nursery, make_config(tmp_path / "gw2", {
            **{k: v for k, v in tomllib.loads(path.read_text()).items() if k != "admin"},
            "admin": {"enabled": False},
            "listener": [{"protocol": "pop3", "bind": "127.0.0.1:0", "tls": "none",
                          "plaintext_auth_from": ["127.0.0.0/8"],
                          "proxy_protocol_from": ["127.0.0.1/32"]}]}))
        with trio.fail_after(20):
            while True:
                try:
                    (await trio.open_tcp_stream("127.0.0.1", port1)).socket.close()
                    break
                except OSError:
                    await trio.sleep(0.05)
        haproxy = LabHAProxy([Frontend("pop3", [("127.0.0.1", port1), second.addresses[0]])])
        await trio.to_thread.run_sync(haproxy.start)
        try:
            session, answer = await pop3_via(("127.0.0.1", port1), header=True)
            assert answer.startswith(b"+OK"), (answer, log.read_text()[-2000:])
            other, refused = await pop3_via(second.addresses[0], header=True)
            assert refused.startswith(b"-ERR [IN-USE]"), refused
            await other.aclose()
            assert (await session.command("DELE 2")).startswith(b"+OK")  # pending at the kill
            assert (await session.command("RETR 1")).startswith(b"+OK")
            await session.exactly(200_000)  # mid-RETR
            first_instance.kill()  # kill -9 of instance 1
            first_instance.wait()
            await session.aclose()
            with trio.fail_after(30):
                while True:  # through HAProxy: redispatched to instance 2
                    again, answer = await pop3_via(haproxy.address("pop3"), header=False)
                    if answer.startswith(b"+OK"):
                        break
                    await again.aclose()
                    await trio.sleep(0.2)
            assert (await again.command("STAT")).startswith(b"+OK 2 ")  # nothing deleted
            await again.command("QUIT")
            await again.aclose()
        finally:
            await trio.to_thread.run_sync(haproxy.stop)
            second.shutdown()
            await second.finished.wait()
            second.ctx.store.close()
    finally:
        first_instance.kill()
        first_instance.wait()


async def test_migrate_store_copies_every_byte(tmp_path: Path, lab: LabDovecot,
                                               oauth_server: LabOAuthServer, lab_user: str,
                                               pg_url: str) -> None:
    config = instance_config(tmp_path, lab, oauth_server, lab_user, pg_url)
    _, refresh_token = oauth_server.issue_tokens(lab_user)
    await seed_account(instance_config(tmp_path, lab, oauth_server, lab_user, None), refresh_token)
    source = StateStore(config.server.state_dir)
    source.save_secret(USER, ACCESS_TOKEN, "lab", b"\x01sealed access")
    source.set_status(USER, "needs_reauthorization", "invalid_grant")
    source.remember_address(USER, b"d" * 32, 1234.5, forget_before=0)  # a working device
    for _ in range(2):  # running it again is harmless
        assert await trio.to_thread.run_sync(migrate_store, config, io.StringIO()) == 0
    target = PgStore(pg_url, max_connections=2, timeout=3)
    try:
        assert target.account_names() == source.account_names() == [USER]
        a, b = source.account(USER), target.account(USER)
        assert a is not None and b is not None
        assert (a.password_hash, a.key_wrapping, a.kdf, a.wrapped_key, a.created) == (
            b.password_hash, b.key_wrapping, b.kdf, b.wrapped_key, b.created)
        for kind in (REFRESH_TOKEN, ACCESS_TOKEN):
            assert source.secret(USER, kind).sealed == target.secret(USER, kind).sealed  # type: ignore[union-attr]
        assert target.status(USER).detail == "invalid_grant"  # type: ignore[union-attr]
        # The devices stay remembered: the same digests, under the same key.
        assert target.address_key() == source.address_key()
        assert target.trusted_addresses() == source.trusted_addresses() == [(USER, b"d" * 32, 1234.5)]
    finally:
        target.close()
    # Without [store] url it says what is missing instead of copying anywhere.
    out = io.StringIO()
    plain = instance_config(tmp_path, lab, oauth_server, lab_user, None)
    assert migrate_store(plain, out) == 1 and "[store] url" in out.getvalue()


async def test_fifty_logins_over_two_instances_refresh_once(
        cluster: Cluster, oauth_server: LabOAuthServer) -> None:
    oauth_server.rotate_refresh_tokens = True
    # Warm up: each instance serves one login (the first refreshes, the second reuses it).
    start = len(oauth_server.token_requests)
    for server in cluster.servers:
        wire = Wire(await trio.open_tcp_stream(*server.addresses[0], local_address="127.0.0.1"),
                    None)  # type: ignore[arg-type]
        # Directly, as HAProxy would: a PROXY v1 header naming a loopback client.
        await wire.send(b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 143\r\n")
        assert (await wire.line()).startswith(b"* OK")
        assert (await wire.command(b"a1 LOGIN " + quoted(USER) + b" " + quoted(PASSWORD)))[-1] \
            .startswith(b"a1 OK")
        await wire.aclose()
    assert len(oauth_server.token_requests) - start == 1
    # Force the shared access token to expire: the upstream server now rejects it.
    token = await cluster.servers[0].ctx.accounts.account(USER).access_token()  # type: ignore[attr-defined]
    oauth_server.expire(token)
    start = len(oauth_server.token_requests)
    answers: list[bytes] = []

    async def one() -> None:
        answers.append(await cluster.login())

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
    failed = [a for a in answers if b"a1 OK" not in a]
    assert not failed, failed[:3]
    requests = oauth_server.token_requests[start:]
    assert [(r["grant_type"], r["error"]) for r in requests] == [("refresh_token", None)]
    served = [sum(1 for e in s.ctx.events.recent if e["type"] == "session.authenticated")
              for s in cluster.servers]
    assert min(served) >= 10, served  # HAProxy spread them over both (round robin)
    status = cluster.servers[1].ctx.store.status(USER)
    assert status is not None and status.state == "ok"


async def test_postgresql_restart_under_load_is_a_temporary_failure(
        cluster: Cluster, postgres: LabPostgres) -> None:
    assert b"a1 OK" in await cluster.login()
    answers: list[bytes] = []
    try:
        await trio.to_thread.run_sync(postgres.stop)
        with trio.fail_after(60):
            for _ in range(6):
                answers.append(await cluster.login())
    finally:
        if not postgres.running:
            await trio.to_thread.run_sync(postgres.start)
    assert all(b"[UNAVAILABLE]" in a for a in answers), answers
    assert not any(b"ALERT" in a or b"authoriz" in a.lower() for a in answers)
    # Recovery without a restart of mailgate.
    with trio.fail_after(30):
        while True:
            answer = await cluster.login()
            if b"a1 OK" in answer:
                break
            assert b"[UNAVAILABLE]" in answer, answer
            await trio.sleep(0.2)
    for _ in range(4):  # both instances (round robin)
        assert b"a1 OK" in await cluster.login()
    store = cluster.servers[0].ctx.store
    status = await trio.to_thread.run_sync(store.status, USER)
    assert status is None or status.state == "ok"


async def test_pop3_listing_is_shared_by_the_instances(
        nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
        lab_user: str, pg_url: str) -> None:
    """A POP3 session on instance 2 starts from the listing a session on instance 1 left in
    PostgreSQL: it asks the upstream only for the message added since, not for the sizes it
    already knows (a size altered in the stored row shows through unchanged)."""
    config = instance_config(tmp_path / "seed", lab, oauth_server, lab_user, pg_url)
    _, refresh_token = oauth_server.issue_tokens(lab_user)
    await seed_account(instance_config(tmp_path / "seed", lab, oauth_server, lab_user, None),
                       refresh_token)
    assert await trio.to_thread.run_sync(migrate_store, config, io.StringIO()) == 0
    bodies = [b"Subject: m%d\r\n\r\n%s\r\n" % (i, b"x" * (10 + i)) for i in range(3)]
    for raw in bodies[:2]:
        await trio.to_thread.run_sync(lambda raw=raw: seed.append(lab, lab_user, raw))
    servers = [await start_gateway(nursery, make_config(tmp_path / f"gw{i}", {
        **tomllib.loads(_toml_config(tmp_path / f"gw{i}", lab, oauth_server, lab_user, pg_url,
                                     _free_port(), _free_port()).read_text()),
        "admin": {"enabled": False}})) for i in (1, 2)]
    store = PgStore(pg_url, max_connections=2, timeout=3)
    try:
        async def session(server: GatewayServer) -> tuple[list[tuple[int, str]],
                                                          list[tuple[int, str]]]:
            wire, answer = await pop3_via(server.addresses[0], header=True)
            assert answer.startswith(b"+OK"), answer
            listed, uidls = await wire.listing("LIST"), await wire.listing("UIDL")
            assert (await wire.command("QUIT")).startswith(b"+OK")
            await wire.aclose()
            return listed, uidls

        with trio.fail_after(30):
            listed, uidls = await session(servers[0])
        assert [int(s) for _, s in listed] == [len(raw) for raw in bodies[:2]]
        remembered = Listings(store).load(USER)
        assert remembered is not None and [m[1] for m in remembered.messages] == [
            len(raw) for raw in bodies[:2]]
        # Mark the stored row: a session that fetched the sizes again would list the real one.
        first, *rest = remembered.messages
        Listings(store).save(USER, replace(remembered, messages=(
            (first[0], first[1] + 1000, first[2]), *rest)))
        await trio.to_thread.run_sync(lambda: seed.append(lab, lab_user, bodies[2]))
        with trio.fail_after(30):
            listed2, uidls2 = await session(servers[1])
        assert [int(s) for _, s in listed2] == [len(bodies[0]) + 1000, len(bodies[1]),
                                                 len(bodies[2])]
        assert uidls2[:2] == uidls and len({u for _, u in uidls2}) == 3
        again = Listings(store).load(USER)
        assert again is not None and len(again.messages) == 3
        assert not list(tmp_path.glob("gw*/state/pop3/*.json"))  # nothing on local disk
    finally:
        store.close()
        for server in servers:
            server.shutdown()
            await server.finished.wait()
            server.ctx.store.close()
