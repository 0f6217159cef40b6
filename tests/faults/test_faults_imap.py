"""IMAP sessions (the relay) and logins while the upstream IMAP server or the identity provider
misbehaves: the client is told, the mailbox is exactly as IMAP says, the gateway lets go of
every resource and keeps serving."""

from __future__ import annotations

import re

import pytest
import trio

from tests.faults.support import Rig, _quoted
from tests.fixtures.imap import PASSWORD, Wire, seed_account

pytestmark = pytest.mark.lab

SMALL = b"Subject: small\r\n\r\nsmall body\r\n"
BIG = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * 40_000 + b"\r\n"
AUTH_FAILED = b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
UNAVAILABLE = b"a NO [UNAVAILABLE] Mail server temporarily unavailable, try again later.\r\n"


async def login(rig: Rig) -> list[bytes]:
    """The answer to a LOGIN on a fresh connection (which is then closed)."""
    w = await rig.imap.wire()
    assert (await w.line()).startswith(b"* OK")
    lines = await w.command(b"a LOGIN alice " + _quoted(PASSWORD))
    await w.aclose()
    return lines


async def logged_in(rig: Rig) -> Wire:
    w = await rig.imap.wire()
    assert (await w.line()).startswith(b"* OK")
    lines = await w.command(b"a LOGIN alice " + _quoted(PASSWORD))
    assert lines[-1].startswith(b"a OK "), lines
    lines = await w.command(b's SELECT "' + rig.mailbox.encode() + b'"')
    assert lines[-1].startswith(b"s OK "), lines
    return w


async def until_closed(w: Wire) -> bytes:
    out = bytearray(w.buf)
    w.buf.clear()
    with trio.fail_after(15):
        while await w._fill():
            out += w.buf
            w.buf.clear()
    await w.aclose()
    return bytes(out)


# --- upstream IMAP faults ----------------------------------------------------------------------


async def test_upstream_dropped_mid_fetch(rig: Rig) -> None:
    uids = [await rig.append(BIG)]
    w = await logged_in(rig)
    rule = rig.imap_proxy.arm("down", "drop", rb"BODY\[\] \{\d+\}\r\n", after=100_000)
    await w.send(b"f UID FETCH %d (BODY.PEEK[])\r\n" % uids[0])
    got = await until_closed(w)
    assert rule.fired.is_set()
    # Cut inside the literal: the client sees the connection end, never a short message that
    # parses as complete, and no tagged OK.
    assert re.search(rb"\{%d\}\r\n" % len(BIG), got)
    assert len(got) < len(BIG) and b"f OK" not in got
    await rig.settled()
    assert await rig.uids() == uids and await rig.flags(uids[0]) == set()
    await rig.still_serves()


async def test_upstream_dropped_between_responses_gets_bye(rig: Rig) -> None:
    uids = [await rig.append(SMALL), await rig.append(SMALL)]
    w = await logged_in(rig)
    rig.imap_proxy.arm("up", "drop", rb"^\S+ UID STORE ")
    await w.send(b"t UID STORE %d +FLAGS (\\Flagged)\r\n" % uids[0])
    got = await until_closed(w)
    assert b"* BYE" in got and b"t OK" not in got
    await rig.settled()
    assert await rig.uids() == uids
    assert "\\Flagged" not in await rig.flags(uids[0])  # the command never reached Dovecot
    await rig.still_serves()


async def test_upstream_dropped_mid_expunge_answer(rig: Rig) -> None:
    """The EXPUNGE ran upstream, its answer was lost: exactly the \\Deleted message is gone."""
    uids = [await rig.append(SMALL) for _ in range(3)]
    w = await logged_in(rig)
    lines = await w.command(b"d UID STORE %d +FLAGS.SILENT (\\Deleted)" % uids[1])
    assert lines[-1].startswith(b"d OK"), lines
    rule = rig.imap_proxy.arm("down", "drop", rb"\* \d+ EXPUNGE\r\n", after=0)
    await w.send(b"e EXPUNGE\r\n")
    got = await until_closed(w)
    assert rule.fired.is_set() and b"e OK" not in got
    await rig.settled()
    assert await rig.uids() == [uids[0], uids[2]]
    await rig.still_serves()


async def test_upstream_stalls_at_login(rig: Rig) -> None:
    rig.imap_proxy.arm("down", "stall", None)  # TCP and TLS work, then not one IMAP byte
    with trio.fail_after(15):
        assert await login(rig) == [UNAVAILABLE]
    await rig.settled()
    await rig.still_serves()


async def test_upstream_stalls_mid_fetch(rig: Rig) -> None:
    """No upstream byte for upstream_command_timeout in the middle of a literal: the client
    connection ends (no BYE could be inserted into message data) and everything is freed."""
    uids = [await rig.append(BIG)]
    w = await logged_in(rig)
    rule = rig.imap_proxy.arm("down", "stall", rb"BODY\[\] \{\d+\}\r\n", after=10_000)
    await w.send(b"f UID FETCH %d (BODY.PEEK[])\r\n" % uids[0])
    with trio.fail_after(10):  # upstream_command_timeout is 2 s in the rig
        got = await until_closed(w)
    assert rule.fired.is_set() and b"f OK" not in got and len(got) < len(BIG)
    await rig.settled()
    assert await rig.uids() == uids and await rig.flags(uids[0]) == set()
    await rig.still_serves()


async def test_upstream_stalls_between_responses_gets_bye(rig: Rig) -> None:
    await rig.append(SMALL)
    w = await logged_in(rig)
    rig.imap_proxy.arm("up", "stall", rb"^\S+ UID SEARCH ")
    await w.send(b"q UID SEARCH ALL\r\n")
    with trio.fail_after(10):
        got = await until_closed(w)
    assert got == b"* BYE Upstream server did not answer in time.\r\n"
    await rig.settled()
    await rig.still_serves()


async def test_idle_upstream_silence_is_not_a_stall(rig: Rig) -> None:
    """IDLE may be silent far longer than upstream_command_timeout."""
    w = await logged_in(rig)
    await w.send(b"i IDLE\r\n")
    assert (await w.line()).startswith(b"+ ")
    await trio.sleep(rig.config.limits.upstream_command_timeout + 1)
    await w.send(b"DONE\r\n")
    assert (await w.until_tagged(b"i"))[-1].startswith(b"i OK")
    await w.command(b"z LOGOUT")
    await w.aclose()
    await rig.settled()


async def test_upstream_stalls_mid_fetch_client_can_leave(rig: Rig) -> None:
    """A stalled upstream in the relay: when the client gives up first, everything is freed."""
    uids = [await rig.append(BIG)]
    w = await logged_in(rig)
    rule = rig.imap_proxy.arm("down", "stall", rb"BODY\[\] \{\d+\}\r\n", after=10_000)
    await w.send(b"f UID FETCH %d (BODY.PEEK[])\r\n" % uids[0])
    with trio.fail_after(10):
        await rule.fired.wait()
    await w.aclose()  # the user presses "cancel"
    await rig.settled()
    assert await rig.uids() == uids and await rig.flags(uids[0]) == set()


async def test_m365_token_expired_bye_mid_session(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    uids = [await rig.append(SMALL)]
    w = await logged_in(rig)
    rig.imap_proxy.arm("up", "reply", rb"^\S+ NOOP", close=True,
                       reply=b"* BYE Session invalidated - AccessTokenExpired\r\n")
    await w.send(b"n NOOP\r\n")
    got = await until_closed(w)
    assert b"* BYE" in got  # the client is told the session is over (and reconnects)
    assert "AccessTokenExpired" in caplog.text and "refreshed token" in caplog.text
    await rig.settled()
    assert await rig.uids() == uids
    # The next login refreshes the token and works.
    assert (await login(rig))[-1].startswith(b"a OK ")
    await rig.settled()


async def test_m365_throttled_answer_reaches_the_client(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    await rig.append(SMALL)
    w = await logged_in(rig)
    rig.imap_proxy.arm(
        "up", "reply", rb"^\S+ UID SEARCH ",
        reply=b"{tag} NO Request is throttled. Suggested Backoff Time: 500 milliseconds\r\n",
    )
    lines = await w.command(b"q UID SEARCH ALL")
    assert lines[-1].startswith(b"q NO ") and b"throttled" in lines[-1]
    assert "upstream_connections_per_account" in caplog.text  # logged with advice
    lines = await w.command(b"r UID SEARCH ALL")  # the session goes on after the back-off
    assert lines[-1].startswith(b"r OK"), lines
    await w.command(b"z LOGOUT")
    await w.aclose()
    await rig.settled()


async def test_m365_throttled_login(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.imap_proxy.arm(
        "up", "reply", rb"^\S+ AUTHENTICATE ",
        reply=b"{tag} NO Request is throttled. Suggested Backoff Time: 500 milliseconds\r\n",
    )
    assert await login(rig) == [UNAVAILABLE]
    assert "Suggested Backoff Time" in caplog.text
    await rig.settled()
    await rig.still_serves()


async def test_m365_authenticated_but_not_connected(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.imap_proxy.arm("up", "reply", rb"^\S+ AUTHENTICATE ", times=None,
                       reply=b"{tag} BAD User is authenticated but not connected.\r\n")
    lines = await login(rig)
    assert lines[-1] == AUTH_FAILED and b"[ALERT]" in lines[0]
    assert "mailbox permissions" in caplog.text  # the advice for the operator
    await rig.settled()
    await rig.still_serves()


# --- identity provider faults ------------------------------------------------------------------


@pytest.mark.parametrize("mode", [("status", 503), ("status", 500), ("malformed",)],
                         ids=["503", "500", "malformed-json"])
async def test_identity_provider_errors_are_temporary(rig: Rig, mode: tuple) -> None:
    rig.oauth.fail_mode = mode
    try:
        assert await login(rig) == [UNAVAILABLE]
        w = await rig.pop.wire()
        assert await w.command("USER alice") == b"+OK\r\n"
        assert (await w.command(f"PASS {rig.pop.password}")).startswith(b"-ERR [SYS/TEMP]")
        await w.aclose()
    finally:
        rig.oauth.fail_mode = None
    await rig.settled()
    assert rig.slots_in_use() == 0
    with trio.fail_after(20):  # recovers once the IdP is back (after the token back-off)
        while not (await login(rig))[-1].startswith(b"a OK "):
            await trio.sleep(0.5)


async def test_identity_provider_hangs(rig: Rig) -> None:
    rule = rig.idp_proxy.arm("up", "stall", rb"^POST /token", times=None)
    with trio.fail_after(15):  # token_request_timeout is 2 s in the rig
        assert await login(rig) == [UNAVAILABLE]
    assert rule.fired.is_set()
    rig.idp_proxy.disarm()
    await rig.settled()
    with trio.fail_after(20):
        while not (await login(rig))[-1].startswith(b"a OK "):
            await trio.sleep(0.5)


async def test_identity_provider_drops_the_connection(rig: Rig) -> None:
    rig.idp_proxy.arm("down", "drop", rb"HTTP/1\.[01] ", after=0, times=None)
    assert await login(rig) == [UNAVAILABLE]
    rig.idp_proxy.disarm()
    await rig.settled()


async def test_identity_provider_invalid_grant(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    # A refresh token of this test's own (the session's seeded one is shared), then revoked.
    _, refresh_token = rig.oauth.issue_tokens(rig.upstream_user)
    await seed_account(rig.config, refresh_token)
    rig.oauth.revoke(refresh_token)
    lines = await login(rig)
    assert lines[-1] == AUTH_FAILED and b"[ALERT]" in lines[0]
    assert "mailgate authorize alice" in caplog.text
    w = await rig.pop.wire()
    assert await w.command("USER alice") == b"+OK\r\n"
    assert (await w.command(f"PASS {rig.pop.password}")).startswith(b"-ERR [AUTH]")
    await w.aclose()
    await rig.settled()
