"""IMAP through mailgate when things break: revoked grant, IdP down, upstream down or killed."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import trio

from tests.fixtures.imap import Gate, create_mailbox, logged_in, quoted, start_seeded_gate
from tests.lab import seed
from tests.lab.corpus import big_message_chunks

pytestmark = pytest.mark.lab

AUTH_FAILED = b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
UNAVAILABLE = b"a NO [UNAVAILABLE] Mail server temporarily unavailable, try again later.\r\n"


async def login_answer(gate: Gate) -> list[bytes]:
    w = await gate.wire()
    await w.line()
    lines = await w.command(b"a LOGIN alice " + quoted(gate.password))
    await w.aclose()
    return lines


async def test_revoked_refresh_token_asks_for_reauthorization(
    own_gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    own_gate.oauth.revoke(own_gate.refresh_token)
    assert await login_answer(own_gate) == [
        b"* NO [ALERT] Your mail account must be authorized again: please contact your administrator.\r\n",
        AUTH_FAILED,
    ]
    assert "mailgate authorize alice" in caplog.text


async def test_identity_provider_down(gate: Gate) -> None:
    gate.oauth.fail_mode = ("status", 503)
    try:
        assert await login_answer(gate) == [UNAVAILABLE]
    finally:
        gate.oauth.fail_mode = None
    with trio.fail_after(15):  # and it recovers once the IdP is back (after the token back-off)
        while not (await login_answer(gate))[-1].startswith(b"a OK "):
            await trio.sleep(0.5)


async def test_upstream_down(nursery: trio.Nursery, tmp_path: Path, lab, oauth_server, seeded_state) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    lab_view = type("DeadLab", (), {"host": lab.host, "ports": {"imaps": dead_port}, "ca_file": lab.ca_file})
    gate = await start_seeded_gate(nursery, tmp_path, lab_view, oauth_server, seeded_state)
    assert await login_answer(gate) == [UNAVAILABLE]


async def test_upstream_killed_mid_fetch_ends_the_client_session(gate: Gate) -> None:
    await trio.to_thread.run_sync(create_mailbox, gate)
    size = 20 * 1024 * 1024
    await trio.to_thread.run_sync(
        lambda: seed.append(gate.lab, gate.upstream_user, big_message_chunks(size), gate.mailbox, size=size)
    )
    w = await logged_in(gate)
    await w.command(b"s SELECT " + quoted(gate.mailbox))
    await w.send(b"f UID FETCH 1 (BODY.PEEK[])\r\n")
    head = await w.line()
    assert re.search(rb"\{%d\}\r\n\Z" % size, head), head
    await w.exactly(65536)  # the body is flowing; now kill the upstream session
    await trio.to_thread.run_sync(gate.lab.kill_connections, gate.upstream_user)
    received = 0
    with trio.fail_after(20):  # nothing hangs: the connection ends
        while await w._fill():
            received += len(w.buf)
            w.buf.clear()
    assert received < size  # the message was cut: the client saw an error, not a short message
    await w.aclose()


async def test_upstream_bye_between_responses_is_relayed(gate: Gate) -> None:
    w = await logged_in(gate)
    await w.command(b"s SELECT INBOX")
    await trio.to_thread.run_sync(gate.lab.kill_connections, gate.upstream_user)
    lines = []
    with trio.fail_after(20):
        while line := await w.line():
            lines.append(line)
    assert lines and lines[-1].startswith(b"* BYE "), lines
    await w.aclose()


async def test_client_disconnect_logs_the_upstream_out(gate: Gate) -> None:
    before = gate.lab.log_text().count("Logged out")
    w = await logged_in(gate)
    await w.command(b"s SELECT INBOX")
    await w.aclose()  # no LOGOUT: the client just goes
    with trio.fail_after(10):
        while gate.lab.log_text().count("Logged out") == before:
            await trio.sleep(0.05)
