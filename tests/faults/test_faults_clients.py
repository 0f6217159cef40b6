"""Misbehaving clients and the limits that contain them: garbage, oversized lines, unterminated
literals, half-finished TLS handshakes, a thousand silent connections, clients that vanish
mid-answer, password guessing, more sessions than the upstream allows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from tests.faults.support import Rig, _quoted, start_rig
from tests.fixtures.imap import PASSWORD, SeededState
from tests.lab import LabDovecot, LabOAuthServer

pytestmark = pytest.mark.lab

SMALL = b"Subject: small\r\n\r\nsmall body\r\n"
BIG = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * 40_000 + b"\r\n"
#: The silent-connection tests use short pre-login deadlines.
SHORT = {"login_timeout": 1.5, "tls_handshake_timeout": 1.5}
SILENT_CONNECTIONS = 1000
SILENT_TIMEOUT = 8.0  # login/TLS deadline while 1,000 connections are opened
SOURCE_ADDRESSES = [f"127.0.0.{n}" for n in range(2, 12)]  # 10 × 100 = the per-IP default


async def read_to_eof(stream: trio.abc.Stream, timeout: float = 10) -> bytes:
    out = bytearray()
    with trio.fail_after(timeout):
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            if not data:
                break
            out += data
    await stream.aclose()
    return bytes(out)


async def connect(rig: Rig, index: int, local: str | None = None) -> trio.SocketStream:
    host, port = rig.server.addresses[index]
    return await trio.open_tcp_stream(host, port, local_address=local)


IMAP_PLAIN, POP3_PLAIN, IMAPS, POP3S = 2, 5, 0, 3


async def test_garbage_before_login_ends_the_connection(rig: Rig) -> None:
    for index in (IMAP_PLAIN, POP3_PLAIN):
        stream = await connect(rig, index)
        rnd = os.urandom(4000).replace(b"\n", b"")
        await stream.send_all(b"\x00\xff garbage\r\n" + rnd[:200] + b"\r\n" + rnd[200:400]
                              + b"\r\n" + b"\x16\x03\x01 binary\r\n" * 5)
        got = await read_to_eof(stream)
        assert got.startswith((b"* OK", b"+OK"))  # greeted, then refused and closed
        assert b"BAD" in got or b"-ERR" in got
    await rig.settled()
    await rig.still_serves()


async def test_oversized_lines_before_login(rig: Rig) -> None:
    stream = await connect(rig, IMAP_PLAIN)
    await stream.send_all(b"a LOGIN " + b"x" * (rig.config.limits.max_line_prelogin * 4) + b"\r\n")
    got = await read_to_eof(stream)
    assert b"* BYE" in got and b"a OK" not in got
    stream = await connect(rig, POP3_PLAIN)
    await stream.send_all(b"USER " + b"x" * 100_000 + b"\r\nQUIT\r\n")
    got = await read_to_eof(stream)
    assert b"-ERR" in got
    await rig.settled()
    await rig.still_serves()


async def test_literal_over_the_prelogin_limit_is_refused(rig: Rig) -> None:
    w = await rig.imap.wire("plain")
    assert (await w.line()).startswith(b"* OK")
    too_big = rig.config.limits.max_literal_prelogin + 1
    await w.send(b"a LOGIN {%d}\r\n" % too_big)
    answer = await w.line()
    # No "+" continuation: the octets are never read; the command is refused.
    assert answer.startswith((b"a BAD", b"a NO", b"* BYE")), answer
    await w.aclose()
    await rig.settled()


async def test_unterminated_literal_and_silence_time_out(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    seeded_state: SeededState,
) -> None:
    rig = await start_rig(nursery, tmp_path, lab, oauth_server, seeded_state, **SHORT)
    stream = await connect(rig, IMAP_PLAIN)
    await stream.send_all(b"a LOGIN {20}\r\nalice")  # 5 of the 20 promised octets, then nothing
    with trio.fail_after(10):
        got = await read_to_eof(stream)
    assert b"a OK" not in got
    await rig.settled()


async def test_half_finished_tls_handshakes_are_closed(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    seeded_state: SeededState,
) -> None:
    rig = await start_rig(nursery, tmp_path, lab, oauth_server, seeded_state, **SHORT)
    # The first bytes of a TLS 1.2 ClientHello record, then silence; and plain silence.
    partial_hello = bytes.fromhex("160301020001000200")[:7]
    streams = []
    for index in (IMAPS, POP3S):
        for payload in (partial_hello, b""):
            stream = await connect(rig, index)
            if payload:
                await stream.send_all(payload)
            streams.append(stream)
    with trio.fail_after(10):
        for stream in streams:
            await read_to_eof(stream)  # the gateway closes each one after tls_handshake_timeout
    await rig.settled()
    await rig.still_serves()


async def test_a_thousand_silent_connections(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    seeded_state: SeededState,
) -> None:
    """1,000 connections that never speak (100 from each of ten addresses, the per-IP default)
    while real clients log in and read mail; then every silent one is closed by the gateway."""
    rig = await start_rig(nursery, tmp_path, lab, oauth_server, seeded_state,
                          max_connections=SILENT_CONNECTIONS + 50,
                          login_timeout=SILENT_TIMEOUT, tls_handshake_timeout=SILENT_TIMEOUT,
                          # the loaded machine answers the real client slower than usual
                          token_request_timeout=10, upstream_connect_timeout=10,
                          upstream_command_timeout=10)
    uids = [await rig.append(SMALL)]
    silent: list[trio.SocketStream] = []
    indexes = (IMAP_PLAIN, POP3_PLAIN, IMAPS, POP3S)

    async def open_silent(n: int) -> None:
        local = SOURCE_ADDRESSES[n % len(SOURCE_ADDRESSES)]
        silent.append(await connect(rig, indexes[n % len(indexes)], local))

    async with trio.open_nursery() as openers:
        for n in range(SILENT_CONNECTIONS):
            openers.start_soon(open_silent, n)
    with trio.fail_after(SILENT_TIMEOUT):
        while rig.server.active < SILENT_CONNECTIONS:
            await trio.sleep(0.01)
    # A real client is served meanwhile, over TLS, with a full login and RETR.
    w = await rig.pop.login()
    assert (await w.command("RETR 1")).startswith(b"+OK")
    assert SMALL.replace(b"\r\n", b"") in (await w.body()).replace(b"\r\n", b"")
    # Every silent connection is closed by the gateway (EOF or reset), none is left behind.
    closed = 0

    async def wait_closed(stream: trio.SocketStream) -> None:
        nonlocal closed
        await read_to_eof(stream, timeout=15)
        closed += 1

    async with trio.open_nursery() as waiters:
        for stream in silent:
            waiters.start_soon(wait_closed, stream)
    assert closed == SILENT_CONNECTIONS
    assert rig.server.active == 1  # only the real session remains
    assert await w.command("QUIT") == b"+OK Logging out.\r\n"
    await w.eof()
    await rig.settled()
    assert await rig.uids() == uids


async def test_connections_over_the_per_ip_and_total_limits_are_refused(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    seeded_state: SeededState,
) -> None:
    rig = await start_rig(nursery, tmp_path, lab, oauth_server, seeded_state,
                          max_connections_per_ip=5, max_connections=8)
    held = [await connect(rig, POP3_PLAIN, "127.0.0.20") for _ in range(5)]
    with trio.fail_after(10):
        while rig.server.active < 5:
            await trio.sleep(0.01)
    extra = await connect(rig, POP3_PLAIN, "127.0.0.20")
    assert b"Too many connections" in await read_to_eof(extra)  # per address
    # Another address is served normally, up to the total.
    for _ in range(3):
        other = await connect(rig, POP3_PLAIN, "127.0.0.21")
        with trio.fail_after(10):
            assert (await other.receive_some(100)).startswith(b"+OK")
        held.append(other)
    extra = await connect(rig, POP3_PLAIN, "127.0.0.22")
    assert b"Too many connections" in await read_to_eof(extra)  # in total
    for stream in held:
        await stream.aclose()
    await rig.settled()


async def test_client_vanishes_mid_retr_and_after_dele(rig: Rig) -> None:
    uids = [await rig.append(SMALL), await rig.append(BIG)]
    w = await rig.pop.login()
    assert (await w.command("DELE 1")).startswith(b"+OK")
    assert (await w.command("RETR 2")).startswith(b"+OK")
    await w.line()
    await trio.aclose_forcefully(w.stream)  # gone, no QUIT, most of the message unread
    await rig.settled()
    # No UPDATE state: nothing deleted, nothing marked.
    assert await rig.uids() == uids
    assert "\\Deleted" not in await rig.flags(uids[0])
    await rig.still_serves()


async def test_imap_client_vanishes_mid_fetch(rig: Rig) -> None:
    uids = [await rig.append(BIG)]
    w = await rig.imap.wire()
    await w.line()
    assert (await w.command(b"a LOGIN alice " + _quoted(PASSWORD)))[-1].startswith(b"a OK")
    await w.command(b's SELECT "' + rig.mailbox.encode() + b'"')
    await w.send(b"f UID FETCH %d (BODY.PEEK[])\r\n" % uids[0])
    await w.line()
    await trio.aclose_forcefully(w.stream)
    await rig.settled()  # the upstream session was logged out and closed, its slot freed
    assert await rig.uids() == uids and await rig.flags(uids[0]) == set()


async def test_password_guessing_is_throttled_without_enumeration(rig: Rig) -> None:
    """Wrong passwords from one address: soon even the right password is refused unchecked,
    and every answer -- wrong password, unknown user, throttled -- is the same line."""
    from gateway.defence import AuthThrottle

    # The gateway's own throttle, with a lower refusal threshold to keep the test short.
    refuse_after = 3
    rig.server.ctx.accounts.throttle = AuthThrottle(base_delay=0, refuse_after=refuse_after)

    async def pop_login(user: str, password: str, local: str) -> bytes:
        stream = await connect(rig, POP3_PLAIN, local)
        await stream.send_all(f"USER {user}\r\nPASS {password}\r\nQUIT\r\n".encode())
        lines = (await read_to_eof(stream)).split(b"\r\n")
        return lines[2]  # greeting, USER answer, PASS answer

    answers = set()
    for n in range(refuse_after):
        answers.add(await pop_login("alice" if n % 2 else "mallory", "guess-%d" % n, "127.0.0.30"))
    assert answers == {b"-ERR [AUTH] Authentication failed."}
    runs = rig.server.ctx.accounts.kdf.runs
    assert await pop_login("alice", rig.pop.password, "127.0.0.30") == b"-ERR [AUTH] Authentication failed."
    assert rig.server.ctx.accounts.kdf.runs == runs  # refused without even checking
    await rig.settled()


async def test_upstream_connections_per_account_are_capped(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    seeded_state: SeededState,
) -> None:
    rig = await start_rig(nursery, tmp_path, lab, oauth_server, seeded_state,
                          upstream_connections_per_account=2, upstream_slot_wait=1)
    sessions = []
    for _ in range(2):
        w = await rig.imap.wire()
        await w.line()
        assert (await w.command(b"a LOGIN alice " + _quoted(PASSWORD)))[-1].startswith(b"a OK")
        sessions.append(w)
    # A third session waits upstream_slot_wait, then gets a clear temporary error instead of
    # the provider's "Too many simultaneous connections".
    w = await rig.imap.wire()
    await w.line()
    assert await w.command(b"a LOGIN alice " + _quoted(PASSWORD)) == [
        b"a NO [UNAVAILABLE] Mail server temporarily unavailable, try again later.\r\n"
    ]
    assert rig.imap_proxy.peak_connections == 2
    # POP3 shares the cap; a freed slot serves the waiting session.
    pop = await rig.pop.wire()
    assert await pop.command("USER alice") == b"+OK\r\n"
    async with trio.open_nursery() as n:
        async def release_one() -> None:
            await trio.sleep(0.3)
            await sessions[0].command(b"z LOGOUT")
            await sessions[0].aclose()
        n.start_soon(release_one)
        assert (await pop.command(f"PASS {rig.pop.password}")).startswith(b"+OK")
    # mailgate never held more than two: the slot is released only once the old upstream
    # connection is closed. (The proxy may briefly count three: it notices that close a moment
    # after mailgate made it, so its own count is only exact while nothing is closing.)
    assert rig.server.ctx.connector.slots("alice").peak == 2  # type: ignore[attr-defined]
    await pop.command("QUIT")
    await pop.eof()
    await sessions[1].command(b"z LOGOUT")
    await sessions[1].aclose()
    await w.aclose()
    await rig.settled()


async def test_imap_password_guessing_is_throttled_without_enumeration(rig: Rig) -> None:
    from gateway.defence import AuthThrottle

    refuse_after = 3
    rig.server.ctx.accounts.throttle = AuthThrottle(base_delay=0, refuse_after=refuse_after)

    async def imap_login(user: str, password: str, local: str) -> list[bytes]:
        stream = await connect(rig, IMAP_PLAIN, local)
        await stream.send_all(b"a LOGIN " + _quoted(user) + b" " + _quoted(password)
                              + b"\r\nz LOGOUT\r\n")
        lines = (await read_to_eof(stream)).split(b"\r\n")
        return [line for line in lines if line.startswith(b"a ")]

    failed = [b"a NO [AUTHENTICATIONFAILED] Authentication failed."]
    for n in range(refuse_after):
        assert await imap_login("alice" if n % 2 else "nobody", f"guess-{n}", "127.0.0.40") == failed
    runs = rig.server.ctx.accounts.kdf.runs
    assert await imap_login("alice", PASSWORD, "127.0.0.40") == failed
    assert rig.server.ctx.accounts.kdf.runs == runs
    await rig.settled()
