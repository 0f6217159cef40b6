"""POP3 sessions while the upstream IMAP server misbehaves: nothing may be lost or deleted
that RFC 1939 does not say is deleted, the client must be told, and the gateway must let go of
everything and keep serving."""

from __future__ import annotations

import pytest
import trio

from tests.faults.support import Rig

pytestmark = pytest.mark.lab

SMALL = b"Subject: small\r\n\r\nsmall body\r\n"
BIG = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * 40_000 + b"\r\n"  # 640 KB
TEMP_FAILURE = b"-ERR [SYS/TEMP] Temporary failure, try again later.\r\n"


async def received_until_close(w) -> bytes:  # type: ignore[no-untyped-def]
    out = bytearray()
    while chunk := await w.line():
        out += chunk
    await w.aclose()
    return bytes(out)


async def test_upstream_dropped_mid_retr(rig: Rig) -> None:
    uids = [await rig.append(SMALL), await rig.append(BIG)]
    w = await rig.pop.login()
    assert (await w.command("DELE 1")).startswith(b"+OK")
    rule = rig.imap_proxy.arm("down", "drop", rb"(?:BODY|BINARY)\[\] ~?\{\d+\}\r\n", after=100_000)
    assert await w.command("RETR 2") == f"+OK {len(BIG)} octets\r\n".encode()
    got = await received_until_close(w)
    assert rule.fired.is_set()
    # The client sees the answer end without its final "." (never a truncated message that
    # looks complete) ...
    assert 0 < len(got) < len(BIG) and not got.endswith(b"\r\n.\r\n")
    await rig.settled()
    # ... and nothing was deleted or marked: the session never reached UPDATE.
    assert await rig.uids() == uids
    assert "\\Deleted" not in await rig.flags(uids[0])
    assert "\\Seen" not in await rig.flags(uids[1])
    await rig.still_serves()


async def test_upstream_dropped_mid_list_snapshot(rig: Rig) -> None:
    """The drop comes while mailgate builds the maildrop (the size FETCH after login)."""
    uids = [await rig.append(SMALL) for _ in range(3)]
    rule = rig.imap_proxy.arm("down", "drop", rb"RFC822\.SIZE", after=0)
    w = await rig.pop.wire()
    assert await w.command("USER alice") == b"+OK\r\n"
    answer = await w.command(f"PASS {rig.pop.password}")
    assert answer.startswith(b"-ERR [SYS/TEMP]") or answer == b""
    assert rule.fired.is_set()
    await w.aclose()
    await rig.settled()
    assert await rig.uids() == uids
    await rig.still_serves()


async def test_upstream_dropped_mid_quit_expunge(rig: Rig) -> None:
    """DELE 1, QUIT, and the connection dies as mailgate sends UID EXPUNGE: the client is told
    that deleting failed; messages it did not delete are untouched."""
    uids = [await rig.append(SMALL) for _ in range(3)]
    w = await rig.pop.login()
    assert (await w.command("DELE 2")).startswith(b"+OK")
    rule = rig.imap_proxy.arm("up", "drop", rb"^\S+ UID EXPUNGE ")
    answer = await w.command("QUIT")
    assert rule.fired.is_set()
    assert answer.startswith(b"-ERR [SYS/TEMP]") or answer == b"", answer
    await w.aclose()
    await rig.settled()
    left = await rig.uids()
    assert uids[0] in left and uids[2] in left  # never touched
    for uid in (uids[0], uids[2]):
        assert await rig.flags(uid) == set()
    # RFC 1939 §6: a failed UPDATE may leave the message; the next session still works.
    await rig.still_serves()


async def test_upstream_answer_to_expunge_lost(rig: Rig) -> None:
    """The UID EXPUNGE ran upstream but its answer never arrived: the deleted message is gone,
    exactly that one, and the client was not told "+OK" for something unconfirmed."""
    uids = [await rig.append(SMALL) for _ in range(3)]
    w = await rig.pop.login()
    assert (await w.command("DELE 1")).startswith(b"+OK")
    rule = rig.imap_proxy.arm("down", "drop", rb"\* \d+ EXPUNGE\r\n", after=0)
    answer = await w.command("QUIT")
    assert rule.fired.is_set()
    assert not answer.startswith(b"+OK"), answer
    await w.aclose()
    await rig.settled()
    assert await rig.uids() == uids[1:]
    await rig.still_serves()


async def test_upstream_stalls_mid_retr(rig: Rig) -> None:
    """No bytes at all for longer than upstream_command_timeout: the deadline fires, the client
    connection ends (the answer is incomplete), the upstream connection is closed."""
    uids = [await rig.append(BIG)]
    w = await rig.pop.login()
    rule = rig.imap_proxy.arm("down", "stall", rb"(?:BODY|BINARY)\[\] ~?\{\d+\}\r\n", after=300_000)
    assert (await w.command("RETR 1")).startswith(b"+OK")
    with trio.fail_after(10):  # upstream_command_timeout is 2 s in the rig
        got = await received_until_close(w)
    assert rule.fired.is_set() and not got.endswith(b"\r\n.\r\n")
    await rig.settled()  # the stalled upstream connection was closed by mailgate
    assert await rig.uids() == uids and "\\Seen" not in await rig.flags(uids[0])
    await rig.still_serves()


async def test_upstream_stalls_at_login(rig: Rig) -> None:
    await rig.append(SMALL)
    rig.imap_proxy.arm("down", "stall", None)  # not even a greeting
    w = await rig.pop.wire()
    assert await w.command("USER alice") == b"+OK\r\n"
    with trio.fail_after(10):
        assert await w.command(f"PASS {rig.pop.password}") == TEMP_FAILURE
    await w.aclose()
    await rig.settled()
    await rig.still_serves()


async def test_m365_token_expired_bye_mid_session(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    uids = [await rig.append(SMALL), await rig.append(SMALL)]
    w = await rig.pop.login()
    assert (await w.command("DELE 1")).startswith(b"+OK")
    rig.imap_proxy.arm("up", "reply", rb"^\S+ UID FETCH ", close=True,
                       reply=b"* BYE Session invalidated - AccessTokenExpired\r\n")
    assert await w.command("RETR 2") == TEMP_FAILURE
    await w.aclose()
    await rig.settled()
    assert "AccessTokenExpired" in caplog.text  # the operator sees why
    assert await rig.uids() == uids  # DELE without QUIT deletes nothing
    await rig.still_serves()


async def test_m365_throttled(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    uids = [await rig.append(SMALL)]
    rig.imap_proxy.arm(
        "up", "reply", rb"^\S+ (SELECT|EXAMINE) ", times=None,
        reply=b"{tag} NO Request is throttled. Suggested Backoff Time: 500 milliseconds\r\n",
    )
    w = await rig.pop.wire()
    assert await w.command("USER alice") == b"+OK\r\n"
    assert await w.command(f"PASS {rig.pop.password}") == TEMP_FAILURE
    await w.aclose()
    await rig.settled()
    assert "Suggested Backoff Time" in caplog.text
    assert await rig.uids() == uids
    await rig.still_serves()


async def test_m365_authenticated_but_not_connected(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.imap_proxy.arm("up", "reply", rb"^\S+ AUTHENTICATE ", times=None,
                       reply=b"{tag} BAD User is authenticated but not connected.\r\n")
    w = await rig.pop.wire()
    assert await w.command("USER alice") == b"+OK\r\n"
    answer = await w.command(f"PASS {rig.pop.password}")
    assert answer.startswith(b"-ERR [AUTH]"), answer
    await w.aclose()
    await rig.settled()
    # Logged with advice: the mailbox grant, not the password, is what to fix.
    assert "mailbox permissions" in caplog.text or "mailgate authorize" in caplog.text
    await rig.still_serves()
