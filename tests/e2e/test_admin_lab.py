"""The admin plane with the real gateway in front of the lab (Dovecot + local OAuth server).

The status page, /metrics and the /events WebSocket are read while real IMAP and POP3 sessions
run through the gateway; a stalled event client watches a 20 MB transfer.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url, wrap_client_stream

from gateway.admin.http import serve_admin
from tests.fixtures.admin import PASSWORD, USER, AdminGate, imap_login, lab_config, seed_account
from tests.fixtures.gateway import make_config, start_gateway
from tests.lab import LabDovecot, LabOAuthServer, seed
from tests.lab.corpus import big_message_chunks, big_message_sha256

pytestmark = pytest.mark.lab

BIG = 20 * 1024 * 1024


@pytest.fixture
async def gate(tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
               lab_user: str, nursery: trio.Nursery) -> AdminGate:
    config = make_config(tmp_path, lab_config(tmp_path, lab, oauth_server, {USER: lab_user}))
    _, refresh_token = oauth_server.issue_tokens(lab_user)
    await seed_account(config, USER, refresh_token, PASSWORD)
    server = await start_gateway(nursery, config)
    await nursery.start(serve_admin, server)
    return AdminGate(config, server, lab_user, lab, refresh_token)


def samples(metrics: str) -> dict[str, float]:
    out = {}
    for line in metrics.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_status_page_and_metrics_reflect_a_real_session(gate: AdminGate) -> None:
    await trio.to_thread.run_sync(seed.append, gate.lab, gate.upstream_user, b"Subject: hi\r\n\r\nhello\r\n")
    w = await gate.imap()
    assert (await imap_login(w))[-1].startswith(b"L OK")
    assert (await w.command(b"S SELECT INBOX"))[-1].startswith(b"S OK")
    fetched = await w.command(b"F UID FETCH 1:* (BODY.PEEK[])")
    assert fetched[-1].startswith(b"F OK")
    async with gate.http() as http:
        status = (await http.get("/api/status")).json()
        [session] = status["sessions"]
        assert session["user"] == USER and session["protocol"] == "imap" and session["tls"]
        assert session["state"] == "authenticated" and session["upstream"] == "connected"
        assert session["bytes_out"] > 0 and session["bytes_in"] > 0
        [account] = status["accounts"]
        assert account["name"] == USER and account["authorized"] and account["status"] == "ok"
        assert account["token_valid_until"] > status["gateway"]["now"]
        assert account["last_refresh"] is not None and account["last_error"] is None
        types = [e["type"] for e in status["events"]]
        assert types[:1] == ["session.opened"] and "session.authenticated" in types

        page = (await http.get("/")).text
        assert re.search(r"<td>alice</td><td>imap</td><td>127\.0\.0\.1:\d+</td><td>yes</td>"
                         r"<td>authenticated</td>", page), page
        assert PASSWORD not in page

        live = samples((await http.get("/metrics")).text)
        assert live['mailgate_sessions{protocol="imap"}'] == 1
        assert live['mailgate_logins_total{protocol="imap",result="ok"}'] == 1
        assert live['mailgate_token_refreshes_total{result="ok"}'] == 1
        assert live["mailgate_upstream_connect_seconds_count"] == 1
        # The live session's bytes are in the counter (it may have grown since the snapshot).
        assert live['mailgate_client_bytes_total{direction="out",protocol="imap"}'] >= session["bytes_out"]

        await w.command(b"Z LOGOUT")
        await w.aclose()
        with trio.fail_after(10):
            while (await http.get("/api/status")).json()["sessions"]:
                await trio.sleep(0.02)
        done = samples((await http.get("/metrics")).text)
        assert done['mailgate_sessions{protocol="imap"}'] == 0
        assert done['mailgate_sessions_closed_total{outcome="logout",protocol="imap"}'] == 1
        # Counters never go back: the session's bytes moved from "live" to "closed".
        key = 'mailgate_client_bytes_total{direction="out",protocol="imap"}'
        assert done[key] >= live[key] > 0


async def test_events_of_a_login_arrive_in_order(gate: AdminGate) -> None:
    async with open_websocket_url(f"ws://{gate.admin}/events") as ws:
        w = await gate.imap()
        assert (await imap_login(w, "wrong password", b"A"))[-1].startswith(b"A NO")
        assert (await w.command(b"B LOGIN alice \"" + PASSWORD.encode() + b"\""))[-1].startswith(b"B OK")
        await w.command(b"C LOGOUT")
        await w.aclose()
        raw: list[str] = []

        async def until_closed(n: int) -> None:
            with trio.fail_after(20):
                while sum('"session.closed"' in m for m in raw) < n:
                    raw.append(await ws.get_message())

        await until_closed(1)  # the server ends the IMAP session on its own time
        pop = await gate.pop3()
        await pop.line()
        for command, expect in ((b"USER alice", b"+OK"), (b"PASS " + PASSWORD.encode(), b"+OK"),
                                (b"QUIT", b"+OK")):
            await pop.send(command + b"\r\n")
            assert (await pop.line()).startswith(expect)
        await pop.aclose()
        await until_closed(2)
    assert not any(PASSWORD in m or "wrong password" in m for m in raw)
    events = [json.loads(m) for m in raw]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert len({e["seq"] for e in events}) == len(events)
    story = [(e["type"], e.get("protocol")) for e in events
             if e["type"] in ("session.opened", "login.failed", "session.authenticated",
                              "session.closed")]
    assert story == [
        ("session.opened", "imap"), ("login.failed", "imap"), ("session.authenticated", "imap"),
        ("session.closed", "imap"),
        ("session.opened", "pop3"), ("session.authenticated", "pop3"), ("session.closed", "pop3"),
    ]
    failed = next(e for e in events if e["type"] == "login.failed")
    assert failed["user"] == USER and failed["reason"] == "bad_credentials"
    assert failed["peer"].startswith("127.0.0.1:")
    upstream = [e for e in events if e["type"] == "upstream.connected"]
    # One upstream login: the POP3 session reuses the connection the IMAP session's LOGOUT
    # gave back to the pool (gateway/upstream/pool.py).
    assert len(upstream) == 1 and all(e["user"] == USER for e in upstream)


async def test_a_stalled_event_client_does_not_slow_a_20_mb_transfer(gate: AdminGate) -> None:
    await trio.to_thread.run_sync(
        lambda: seed.append(gate.lab, gate.upstream_user, big_message_chunks(BIG), size=BIG)
    )
    host, port = gate.admin.rsplit(":", 1)
    tcp = await trio.open_tcp_stream(host, int(port))
    async with trio.open_nursery() as nursery, tcp:
        stalled = await wrap_client_stream(nursery, tcp, gate.admin, "/events")
        # The stalled client never reads. While the transfer runs, events keep coming (a busy
        # gateway), far more than its queue and the kernel's buffers hold.
        async def busy_gateway() -> None:
            padding = "x" * 1024
            for i in range(20_000):
                gate.server.events.publish({"type": "test.filler", "i": i, "padding": padding})
                if i % 500 == 0:
                    await trio.sleep(0)

        nursery.start_soon(busy_gateway)
        w = await gate.imap()
        assert (await imap_login(w))[-1].startswith(b"L OK")
        assert (await w.command(b"S SELECT INBOX"))[-1].startswith(b"S OK")
        await w.send(b"F UID FETCH 1 (BODY.PEEK[])\r\n")
        head = await w.line()
        size = int(re.search(rb"\{(\d+)\}\r\n$", head).group(1))  # type: ignore[union-attr]
        assert size == BIG
        digest = hashlib.sha256()
        remaining = size
        with trio.fail_after(60):  # a hang guard, not a timing assertion
            while remaining:
                chunk = await w.exactly(min(remaining, 1 << 20))
                digest.update(chunk)
                remaining -= len(chunk)
            tail = await w.until_tagged(b"F")
        assert tail[-1].startswith(b"F OK")
        assert digest.hexdigest() == big_message_sha256(BIG)
        await w.command(b"Z LOGOUT")
        await w.aclose()
        with trio.fail_after(30):
            while gate.server.events.dropped_subscribers < 1:
                await trio.sleep(0.05)
        with pytest.raises(ConnectionClosed):
            with trio.fail_after(30):
                while True:
                    await stalled.get_message()
        nursery.cancel_scope.cancel()


async def test_web_authorization_refuses_forgeries_and_confirms_the_password(
    gate: AdminGate, oauth_server: LabOAuthServer
) -> None:
    async with gate.http() as stranger:
        forged = await stranger.get("/oauth/callback?state=forged&code=whatever")
        assert forged.status_code == 400 and "unknown, expired or already used" in forged.text
    async with httpx.AsyncClient(base_url=f"http://{gate.admin}", follow_redirects=True,
                                 timeout=10) as admin:
        form = await admin.get("/authorize/alice")
        assert form.status_code == 200 and "current local password" in form.text
        callback = str(form.url)
        assert callback.startswith(f"http://{gate.admin}/oauth/callback?")
        fields = dict(re.findall(r'name="(flow|csrf)" value="([^"]+)"', form.text))
        # The redirect cannot be replayed (its code is spent, its state is used).
        assert (await admin.get(callback)).status_code == 400
        # The form only works from the browser that got it (CSRF cookie, SameSite=Strict).
        async with gate.http() as other_browser:
            stolen = await other_browser.post("/oauth/complete", data={**fields, "password": PASSWORD})
            assert stolen.status_code == 403
        bad = await admin.post("/oauth/complete", data={**fields, "password": "not it"})
        assert bad.status_code == 400 and "wrong local password" in bad.text
        ok = await admin.post("/oauth/complete", data={**fields, "password": PASSWORD})
        assert ok.status_code == 200 and "alice can now log in" in ok.text
        again = await admin.post("/oauth/complete", data={**fields, "password": PASSWORD})
        assert again.status_code == 403
    assert [r["grant_type"] for r in oauth_server.token_requests].count("authorization_code") >= 1
    # The new grant is in use: the login refreshes with it and reaches the upstream.
    w = await gate.imap()
    assert (await imap_login(w))[-1].startswith(b"L OK")
    await w.command(b"Z LOGOUT")
    await w.aclose()
    async with gate.http() as http:
        events = (await http.get("/api/status")).json()["events"]
    assert any(e["type"] == "account.authorized" and e["user"] == USER for e in events)


async def test_a_revoked_grant_shows_on_the_status_page_until_reauthorized(
    gate: AdminGate, oauth_server: LabOAuthServer
) -> None:
    oauth_server.revoke(gate.refresh_token)
    w = await gate.imap()
    assert (await imap_login(w))[-1].startswith(b"L NO")
    await w.aclose()
    async with httpx.AsyncClient(base_url=f"http://{gate.admin}", follow_redirects=True,
                                 timeout=10) as http:
        [account] = (await http.get("/api/status")).json()["accounts"]
        assert account["status"] == "needs_reauthorization"
        assert account["status_detail"] == "invalid_grant"
        assert account["last_error"]["type"] in ("token.failed", "login.failed")
        page = (await http.get("/")).text
        assert "needs re-authorization" in page and 'href="/authorize/alice"' in page
        metrics = samples((await http.get("/metrics")).text)
        assert metrics['mailgate_token_refreshes_total{result="failed"}'] == 1
        assert metrics['mailgate_login_failures_total{protocol="imap",reason="reauthorization_required"}'] == 1

        # The admin follows the link: authorize again, confirm alice's password.
        form = await http.get("/authorize/alice")
        fields = dict(re.findall(r'name="(flow|csrf)" value="([^"]+)"', form.text))
        done = await http.post("/oauth/complete", data={**fields, "password": PASSWORD})
        assert done.status_code == 200
        [account] = (await http.get("/api/status")).json()["accounts"]
        assert account["status"] == "ok"
    w = await gate.imap()
    assert (await imap_login(w))[-1].startswith(b"L OK")
    await w.command(b"Z LOGOUT")
    await w.aclose()
