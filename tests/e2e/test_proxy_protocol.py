"""The PROXY protocol with a real HAProxy in front of the real gateway (gateway/proxied.py).

The gateway's cleartext IMAP listener trusts PROXY headers from 127.0.0.1 (where HAProxy
connects from) and allows password logins only from 127.0.0.5. Test clients connect to HAProxy
from chosen loopback addresses: only the real client address, carried by the header, can make
``plaintext_auth_from``, throttling and the session log come out as asserted.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from gateway.admin.http import serve_admin
from gateway.server import GatewayServer
from tests.fixtures.gateway import lab_provider, make_config, start_gateway
from tests.fixtures.imap import PASSWORD, USER, SeededState, Wire, quoted
from tests.lab import LabDovecot, LabOAuthServer
from tests.lab.haproxy import Frontend, LabHAProxy

CLIENT_OK, CLIENT_OTHER, DIRECT = "127.0.0.5", "127.0.0.6", "127.0.0.7"


@dataclass
class Rig:
    server: GatewayServer
    haproxy: LabHAProxy

    async def wire(self, frontend: str | None, source: str) -> Wire:
        host, port = (self.haproxy.address(frontend) if frontend else self.server.addresses[0])
        tcp = await trio.open_tcp_stream(host, port, local_address=source)
        return Wire(tcp, None)  # type: ignore[arg-type]


@pytest.fixture
async def rig(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
              oauth_server: LabOAuthServer, seeded_state: SeededState) -> AsyncIterator[Rig]:
    config = make_config(tmp_path, {
        "server": {"hostname": "localhost", "state_dir": "state"},
        "listener": [{"protocol": "imap", "bind": "127.0.0.1:0", "tls": "none",
                      "plaintext_auth_from": [f"{CLIENT_OK}/32"],
                      "proxy_protocol_from": ["127.0.0.1/32"]}],
        "admin": {"enabled": False},
        "providers": {"lab": lab_provider(lab, oauth_server)},
        "users": {USER: {"provider": "lab", "upstream_user": seeded_state.upstream_user}},
        "limits": {"auth_failure_delay": 0.01, "token_request_timeout": 5,
                   "proxy_header_timeout": 0.5},
    })
    shutil.copytree(seeded_state.state_dir, config.server.state_dir)
    server = await start_gateway(nursery, config)
    haproxy = LabHAProxy([Frontend("v2", [server.addresses[0]], send_proxy=2),
                          Frontend("v1", [server.addresses[0]], send_proxy=1)])
    await trio.to_thread.run_sync(haproxy.start)
    try:
        yield Rig(server, haproxy)
    finally:
        await trio.to_thread.run_sync(haproxy.stop)


async def login(wire: Wire, user: str = USER, password: str = PASSWORD) -> bytes:
    greeting = await wire.line()
    assert greeting.startswith(b"* OK"), greeting
    answer = (await wire.command(b"a1 LOGIN " + quoted(user) + b" " + quoted(password)))[-1]
    await wire.aclose()
    return answer


@pytest.mark.parametrize("frontend", ["v2", "v1"])
async def test_the_real_client_address_reaches_plaintext_auth_and_the_log(
        rig: Rig, frontend: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    assert (await login(await rig.wire(frontend, CLIENT_OK))).startswith(b"a1 OK")
    # Same proxy, other client: cleartext passwords are not allowed from there.
    refused = await login(await rig.wire(frontend, CLIENT_OTHER))
    assert refused.startswith(b"a1 NO"), refused
    with trio.fail_after(5):
        while "peer=127.0.0.6:" not in caplog.text:
            await trio.sleep(0.02)
    assert f"user=alice peer={CLIENT_OK}:" in caplog.text
    assert f"imap {CLIENT_OK}:" in next(r.getMessage() for r in caplog.records
                                        if "alice logged in" in r.getMessage())


async def test_throttling_sees_the_client_behind_the_proxy(rig: Rig) -> None:
    throttle = rig.server.ctx.accounts.throttle  # type: ignore[attr-defined]
    for _ in range(3):
        wire = await rig.wire("v2", CLIENT_OK)
        assert (await login(wire, "mallory", "guess")).startswith(b"a1 NO")
    assert throttle.penalty(CLIENT_OK, "someone-else") > 0
    assert throttle.penalty("127.0.0.1", "someone-else") == 0
    assert throttle.penalty(CLIENT_OTHER, "someone-else") == 0


async def test_a_forged_header_from_an_untrusted_peer_is_refused(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    wire = await rig.wire(None, DIRECT)
    assert (await wire.line()).startswith(b"* OK")
    await wire.send(b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 143\r\na1 LOGIN x y\r\n")
    assert await wire.line() == b""  # closed, the LOGIN never answered
    await wire.aclose()
    assert "refused a PROXY protocol header from 127.0.0.7" in caplog.text
    # A direct client without a header is served as itself (and may not log in in cleartext).
    assert (await login(await rig.wire(None, DIRECT))).startswith(b"a1 NO")


async def test_a_trusted_peer_without_a_header_gets_no_greeting(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    host, port = rig.server.addresses[0]
    for payload in (b"", b"a1 LOGIN alice pw\r\n", b"PROXY TCP4 1.2.3.4\r\n"):
        wire = Wire(await trio.open_tcp_stream(host, port, local_address="127.0.0.1"), None)  # type: ignore[arg-type]
        await wire.send(payload)
        with trio.fail_after(3):
            assert await wire.line() == b""  # closed without a greeting
        await wire.aclose()
    assert "no PROXY header from 127.0.0.1" in caplog.text
    assert "bad PROXY header from 127.0.0.1" in caplog.text


async def test_haproxy_health_checks_follow_healthz(
        nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
        seeded_state: SeededState) -> None:
    """The documented configuration (docs/operations.md): a draining instance answers 503 on
    /healthz, HAProxy takes it out, and new clients go to the other instance."""
    servers = []
    for name in ("gw1", "gw2"):
        config = make_config(tmp_path / name, {
            "server": {"hostname": "localhost", "state_dir": "state"},
            "listener": [{"protocol": "imap", "bind": "127.0.0.1:0", "tls": "none",
                          "plaintext_auth_from": ["127.0.0.0/8"],
                          "proxy_protocol_from": ["127.0.0.1/32"]}],
            "admin": {"bind": "127.0.0.1:0"},
            "providers": {"lab": lab_provider(lab, oauth_server)},
            "users": {USER: {"provider": "lab", "upstream_user": seeded_state.upstream_user}},
            "limits": {"auth_failure_delay": 0, "shutdown_grace": 30},
        })
        shutil.copytree(seeded_state.state_dir, config.server.state_dir)
        server = await start_gateway(nursery, config)
        await nursery.start(serve_admin, server)
        servers.append(server)
    haproxy = LabHAProxy([Frontend(
        "imap", [s.addresses[0] for s in servers], send_proxy=2,
        health_ports=[s.admin_address[1] for s in servers])])  # type: ignore[attr-defined]
    await trio.to_thread.run_sync(haproxy.start)
    try:
        # A session stays open on gw1, so that draining keeps its listener... until it ends.
        held = Wire(await trio.open_tcp_stream(*servers[0].addresses[0],
                                               local_address="127.0.0.1"), None)  # type: ignore[arg-type]
        await held.send(b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 143\r\n")
        assert (await held.line()).startswith(b"* OK")
        servers[0].shutdown()  # draining: /healthz answers 503
        with trio.fail_after(10):
            while "gw1 is DOWN" not in haproxy.log_text():
                await trio.sleep(0.1)
        for _ in range(4):  # every new client is served by gw2
            assert (await login(await rig_wire(haproxy, CLIENT_OK))).startswith(b"a1 OK")
        assert "gw2 is DOWN" not in haproxy.log_text()
        await held.aclose()
    finally:
        await trio.to_thread.run_sync(haproxy.stop)


async def rig_wire(haproxy: LabHAProxy, source: str) -> Wire:
    tcp = await trio.open_tcp_stream(*haproxy.address("imap"), local_address=source)
    return Wire(tcp, None)  # type: ignore[arg-type]
