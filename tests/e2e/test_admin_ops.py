"""Operations, with the real ``mailgate serve`` process: SIGHUP reloads, logs free of secrets.

Each test writes a config file, runs ``python -m gateway serve`` as a child process (its log on
stderr, captured to a file; tests/fixtures/process.py), and drives it like an admin would: real
signals, the admin port, real IMAP and POP3 sessions through the lab Dovecot, a browser-less web
authorization.
"""

from __future__ import annotations

import base64
import json
import re
import signal
from pathlib import Path

import httpx
import pytest
import trio

from gateway.config import load_config
from gateway.protocol.sasl import xoauth2_initial_response
from tests.fixtures.admin import lab_config, quoted, seed_account
from tests.fixtures.process import (
    ALICE_PASSWORD,
    Process,
    imap_login,
    start_process,
    stop_process,
    to_toml,
    write_config,
)
from tests.lab import LabDovecot, LabOAuthServer, seed

pytestmark = pytest.mark.lab

CAROL_PASSWORD = "carol-local-Pa55word"
WEB_PASSWORD = "dave-web-Pa55word"
WRONG_PASSWORDS = ("wrong-Pa55word-1", "wrong-Pa55word-2")


async def test_sighup_adds_a_user_without_dropping_a_running_session(
    tmp_path: Path, config_file: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    running: list[Process],
) -> None:
    alice_up, carol_up = lab.new_user("alice"), lab.new_user("carol")
    raw = lab_config(tmp_path, lab, oauth_server, {"alice": alice_up},
                     limits={"auth_failure_delay": 0, "shutdown_grace": 2})
    write_config(config_file, raw)
    await seed_account(load_config(config_file), "alice", oauth_server.issue_tokens(alice_up)[1],
                       ALICE_PASSWORD)
    proc = await start_process(config_file, tmp_path / "gateway.log", log_format="json")
    running.append(proc)

    alice = await proc.imap_wire(config_file)
    assert (await imap_login(alice, "alice", ALICE_PASSWORD)).startswith(b"L OK")
    assert (await alice.command(b"S SELECT INBOX"))[-1].startswith(b"S OK")
    carol = await proc.imap_wire(config_file)
    assert (await imap_login(carol, "carol", CAROL_PASSWORD)).startswith(b"L NO")
    await carol.aclose()

    # The admin adds carol to the config, authorizes her, and sends SIGHUP.
    with_carol = lab_config(tmp_path, lab, oauth_server, {"alice": alice_up, "carol": carol_up},
                            limits={"auth_failure_delay": 0, "shutdown_grace": 2})
    write_config(config_file, with_carol)
    await seed_account(load_config(config_file), "carol", oauth_server.issue_tokens(carol_up)[1],
                       CAROL_PASSWORD)
    proc.process.send_signal(signal.SIGHUP)
    await proc.wait_log(r"SIGHUP: configuration reloaded \(2 users\)")

    carol = await proc.imap_wire(config_file)
    assert (await imap_login(carol, "carol", CAROL_PASSWORD)).startswith(b"L OK")
    assert (await carol.command(b"S SELECT INBOX"))[-1].startswith(b"S OK")
    # alice's session, started before the reload, goes on.
    assert (await alice.command(b"N NOOP"))[-1].startswith(b"N OK")
    assert (await alice.command(b"T STATUS INBOX (MESSAGES)"))[-1].startswith(b"T OK")

    # A broken config is refused with its problems logged; the running one stays.
    config_file.write_text(to_toml(with_carol) + "\n[no_such_table]\nx = 1\n")
    proc.process.send_signal(signal.SIGHUP)
    await proc.wait_log(r"SIGHUP: the new configuration was refused")
    await proc.wait_log(r"no_such_table: unknown key")
    again = await proc.imap_wire(config_file)
    assert (await imap_login(again, "carol", CAROL_PASSWORD)).startswith(b"L OK")
    await again.command(b"Z LOGOUT")
    await again.aclose()
    assert (await alice.command(b"N2 NOOP"))[-1].startswith(b"N2 OK")
    async with httpx.AsyncClient(base_url=f"http://{proc.admin}") as http:
        status = (await http.get("/api/status")).json()
    assert sorted(a["name"] for a in status["accounts"]) == ["alice", "carol"]
    assert {s["user"] for s in status["sessions"]} == {"alice", "carol"}
    assert [e["users"] for e in status["events"] if e["type"] == "config.reloaded"] == [2]

    for w, tag in ((alice, b"Z"), (carol, b"Y")):
        await w.command(tag + b" LOGOUT")
        await w.aclose()
    assert await stop_process(proc) == 0
    log = proc.log()
    # --log-format json: one JSON object per line; one line per session end, with its fields
    # (the outcome of a LOGOUT may read client_gone when the client closes at once after OK).
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    ends = [r for r in records if r["message"].startswith("session end:")]
    by_user = {u: [r for r in ends if r.get("user") == u] for u in ("alice", "carol")}
    assert len(by_user["alice"]) == 1 and len(by_user["carol"]) == 2
    for end in by_user["alice"] + by_user["carol"]:
        assert end["protocol"] == "imap" and end["peer"].startswith("127.0.0.1:")
        assert end["bytes_in"] > 0 and end["bytes_out"] > 0 and end["duration"] > 0
        assert end["outcome"] in ("logout", "client_gone") and end["level"] == "info"


def _sasl_forms(user: str, secret: str) -> set[str]:
    """The ways a secret could leak in disguise: base64 SASL blobs that carry it."""
    forms = {base64.b64encode(f"\0{user}\0{secret}".encode()).decode(),
             base64.b64encode(xoauth2_initial_response(user, secret)).decode()
             if "\x01" not in secret else ""}
    return {f for f in forms if f}


async def test_no_secret_in_the_logs_of_a_full_run_at_debug_level(
    tmp_path: Path, config_file: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    running: list[Process],
) -> None:
    alice_up, dave_up = lab.new_user("alice"), lab.new_user("dave")
    raw = lab_config(tmp_path, lab, oauth_server, {"alice": alice_up, "dave": dave_up},
                     limits={"auth_failure_delay": 0, "shutdown_grace": 2})
    write_config(config_file, raw)
    secrets_before = set(oauth_server.all_secrets())
    await seed_account(load_config(config_file), "alice", oauth_server.issue_tokens(alice_up)[1],
                       ALICE_PASSWORD)
    for i in range(2):
        await trio.to_thread.run_sync(
            seed.append, lab, alice_up, b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i))
    proc = await start_process(config_file, tmp_path / "gateway.log")
    running.append(proc)

    # IMAP: a wrong password, LOGIN, AUTHENTICATE PLAIN, a FETCH.
    w = await proc.imap_wire(config_file)
    assert (await imap_login(w, "alice", WRONG_PASSWORDS[0])).startswith(b"L NO")
    assert (await w.command(b"M LOGIN alice " + quoted(ALICE_PASSWORD)))[-1].startswith(b"M OK")
    assert (await w.command(b"F EXAMINE INBOX"))[-1].startswith(b"F OK")
    assert (await w.command(b"G UID FETCH 1:* (BODY.PEEK[])"))[-1].startswith(b"G OK")
    await w.command(b"Z LOGOUT")
    await w.aclose()
    w = await proc.imap_wire(config_file)
    await w.line()
    blob = base64.b64encode(b"\0alice\0" + ALICE_PASSWORD.encode())
    assert (await w.command(b"A AUTHENTICATE PLAIN " + blob))[-1].startswith(b"A OK")
    await w.command(b"Z LOGOUT")
    await w.aclose()

    # The upstream token expires: the gateway refreshes it (token request with the refresh token).
    for secret in set(oauth_server.all_secrets()) - secrets_before:
        try:
            oauth_server.expire(secret)
        except KeyError:
            pass  # not an access token
    # POP3: a wrong password, then a full session that reads a message.
    p = await proc.pop3_wire()
    await p.line()
    for command, answer in ((b"USER alice", b"+OK"), (b"PASS " + WRONG_PASSWORDS[1].encode(), b"-ERR"),
                            (b"USER alice", b"+OK"), (b"PASS " + ALICE_PASSWORD.encode(), b"+OK")):
        await p.send(command + b"\r\n")
        assert (await p.line()).startswith(answer), command
    await p.send(b"RETR 1\r\n")
    while await p.line() != b".\r\n":
        pass
    await p.send(b"QUIT\r\n")
    assert (await p.line()).startswith(b"+OK")
    await p.aclose()

    # The web authorization of dave (code, PKCE, token exchange, password form).
    async with httpx.AsyncClient(base_url=f"http://{proc.admin}", follow_redirects=True,
                                 timeout=15) as http:
        form = await http.get("/authorize/dave")
        assert form.status_code == 200 and "password-form" in form.text
        fields = dict(re.findall(r'name="(flow|csrf)" value="([^"]+)"', form.text))
        done = await http.post("/oauth/complete", data={**fields, "password": WEB_PASSWORD,
                                                        "confirm": WEB_PASSWORD})
        assert done.status_code == 200 and "dave can now log in" in done.text
        for path in ("/", "/api/status", "/metrics"):
            assert (await http.get(path)).status_code == 200
    w = await proc.imap_wire(config_file)
    assert (await imap_login(w, "dave", WEB_PASSWORD)).startswith(b"L OK")
    await w.command(b"Z LOGOUT")
    await w.aclose()
    assert await stop_process(proc) == 0

    log = proc.log()
    # The log really is a debug log of all of that (else this test could not fail).
    assert " DEBUG " in log
    assert len(re.findall(r"session end: ", log)) >= 4
    assert re.search(r"login failed for 'alice'", log) or "bad_credentials" in log or "failed" in log
    assert re.search(r"grant_type|token", log, re.I)

    issued = set(oauth_server.all_secrets()) - secrets_before
    assert len(issued) >= 5  # access + refresh tokens, the refreshed token, the code
    passwords = {ALICE_PASSWORD, WEB_PASSWORD, *WRONG_PASSWORDS}
    needles = set(passwords) | issued
    for user in ("alice", alice_up, "dave", dave_up):
        for secret in passwords | issued:
            needles |= _sasl_forms(user, secret)
    leaked = sorted(n for n in needles if n in log)
    assert not leaked, f"{len(leaked)} secrets in the log"
    # The lab's client secret is the dictionary word "secret": look for it as a value only.
    assert not re.search(r"client_secret[\"']?\s*[:=]\s*[\"']?secret\b", log)
