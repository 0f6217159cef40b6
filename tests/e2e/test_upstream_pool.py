"""The pool of logged-in upstream connections, end to end against the lab Dovecot.

Upstream logins are counted where they happen: every XOAUTH2 login makes Dovecot introspect
the token at the lab OAuth server (no cache), so ``len(oauth.introspections)`` grows by one per
upstream login and by nothing for a reused connection.
"""

from __future__ import annotations

from pathlib import Path

import trio

from gateway.app import reload
from tests.fixtures.gateway import write_config
from tests.fixtures.imap import (
    Gate,
    SeededState,
    logged_in,
    seed_account,
    start_gate,
    start_seeded_gate,
)
from tests.fixtures.pop3 import PopGate, start_pop_gate
from tests.lab import LabDovecot, LabOAuthServer, seed


def _logins(oauth: LabOAuthServer) -> int:
    return len(oauth.introspections)


async def _pop_poll(gate: PopGate) -> list[tuple[int, str]]:
    wire = await gate.login()
    assert (await wire.command("STAT")).startswith(b"+OK")
    uidl = await wire.listing("UIDL")
    assert (await wire.command("QUIT")).startswith(b"+OK")
    await wire.aclose()
    return uidl


async def _imap_session(gate: Gate, *commands: bytes) -> list[list[bytes]]:
    wire = await logged_in(gate)
    answers = [await wire.command(cmd) for cmd in commands]
    lines = await wire.command(b"Z LOGOUT")
    assert lines[0].startswith(b"* BYE") and lines[-1].startswith(b"Z OK"), lines
    await wire.aclose()
    return answers


def _create(gate: Gate) -> None:
    with seed.imap_session(gate.lab, gate.upstream_user) as imap:
        imap.command(b'CREATE "' + gate.mailbox.encode() + b'"')


# ------------------------------------------------------------------ one login for many sessions


async def test_ten_pop3_polls_cost_one_upstream_login(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    pop3_seeded: SeededState,
) -> None:
    gate = await start_pop_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded)
    await gate.append(b"Subject: one\r\n\r\nbody\r\n")
    before = _logins(oauth_server)
    listings = [await _pop_poll(gate) for _ in range(10)]
    assert _logins(oauth_server) - before == 1
    assert all(listing == listings[0] and len(listing) == 1 for listing in listings)
    assert gate.server.ctx.connector.pool.reused("alice") == 9  # type: ignore[attr-defined]


async def test_pop3_delete_then_reuse_sees_the_mailbox_as_it_is(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    pop3_seeded: SeededState,
) -> None:
    gate = await start_pop_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded)
    for n in range(3):
        await gate.append(b"Subject: %d\r\n\r\nbody\r\n" % n)
    wire = await gate.login()
    assert (await wire.command("DELE 2")).startswith(b"+OK")
    assert (await wire.command("QUIT")).startswith(b"+OK")
    await wire.aclose()
    await gate.append(b"Subject: new\r\n\r\nbody\r\n")
    before = _logins(oauth_server)
    listing = await _pop_poll(gate)
    assert _logins(oauth_server) == before
    assert [n for n, _ in listing] == [1, 2, 3]
    assert len(await gate.uids()) == 3


async def test_ten_imap_sessions_cost_one_upstream_login(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    seeded_state: SeededState,
) -> None:
    gate = await start_seeded_gate(nursery, tmp_path, lab, oauth_server, seeded_state)
    before = _logins(oauth_server)
    for _ in range(10):
        (select,) = await _imap_session(gate, b"S SELECT INBOX")
        assert select[-1].startswith(b"S OK")
    assert _logins(oauth_server) - before == 1


# ------------------------------------------------------------------ nothing leaks


async def test_session_state_never_reaches_the_next_session(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    seeded_state: SeededState,
) -> None:
    gate = await start_seeded_gate(nursery, tmp_path, lab, oauth_server, seeded_state)
    await trio.to_thread.run_sync(_create, gate)
    before = _logins(oauth_server)

    async def fresh_view() -> None:
        """What a new session sees: no mailbox selected, nothing unsolicited."""
        (noop, fetch) = await _imap_session(gate, b"N NOOP", b"F FETCH 1 FLAGS")
        assert noop == [b"N OK NOOP completed.\r\n"] or noop[-1].startswith(b"N OK"), noop
        assert not any(line.startswith(b"* ") for line in noop), noop
        assert fetch[-1].startswith((b"F BAD", b"F NO")), fetch

    # SELECT and EXAMINE: the pool leaves the mailbox (UNSELECT) and reuses the connection.
    await _imap_session(gate, b"S SELECT INBOX")
    await fresh_view()
    await _imap_session(gate, b"E EXAMINE " + gate.mailbox.encode())
    await fresh_view()
    # A completed IDLE leaves nothing behind.
    wire = await logged_in(gate)
    await wire.command(b"S SELECT INBOX")
    await wire.send(b"I IDLE\r\n")
    assert (await wire.line()).startswith(b"+")
    await wire.send(b"DONE\r\n")
    assert (await wire.until_tagged(b"I"))[-1].startswith(b"I OK")
    assert (await wire.command(b"Z LOGOUT"))[-1].startswith(b"Z OK")
    await wire.aclose()
    await fresh_view()
    assert _logins(oauth_server) - before == 1  # all of the above on one upstream login

    # ENABLE lasts for the connection: it is logged out, the next session logs in afresh.
    (enable,) = await _imap_session(gate, b"X ENABLE CONDSTORE")
    assert enable[-1].startswith(b"X OK")
    await fresh_view()
    assert _logins(oauth_server) - before == 2
    (select,) = await _imap_session(gate, b"S SELECT INBOX")
    assert not any(b"HIGHESTMODSEQ" in line for line in select), select  # CONDSTORE is off
    # SELECT ... (CONDSTORE) enables it as well.
    await _imap_session(gate, b"S SELECT INBOX (CONDSTORE)")
    await fresh_view()
    assert _logins(oauth_server) - before == 3

    # An unfinished IDLE, and a command cut off by a vanishing client: never reused.
    wire = await logged_in(gate)
    await wire.send(b"I IDLE\r\n")
    assert (await wire.line()).startswith(b"+")
    await wire.aclose()
    wire = await logged_in(gate)
    await wire.send(b"A APPEND INBOX {50}\r\n")
    await wire.aclose()
    await trio.sleep(0.2)
    await fresh_view()
    assert _logins(oauth_server) - before == 5  # the unfinished IDLE reused the last one


# ------------------------------------------------------------------ invisible fresh logins


async def test_pooled_connection_killed_by_the_upstream_is_replaced_invisibly(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    pop3_seeded: SeededState,
) -> None:
    gate = await start_pop_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded)
    await gate.append(b"Subject: one\r\n\r\nbody\r\n")
    first = await _pop_poll(gate)
    before = _logins(oauth_server)
    assert await trio.to_thread.run_sync(lab.kill_connections, gate.upstream_user)
    await trio.sleep(0.2)
    assert await _pop_poll(gate) == first
    assert _logins(oauth_server) - before == 1


async def test_a_newer_access_token_means_a_fresh_login(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    seeded_state: SeededState,
) -> None:
    """The token a pooled connection logged in with is about to expire (mailgate refreshed
    it): the connection is not reused."""
    oauth_server.access_token_lifetime = 3
    gate = await start_seeded_gate(nursery, tmp_path, lab, oauth_server, seeded_state)
    await _imap_session(gate)
    before = _logins(oauth_server)
    await _imap_session(gate)
    assert _logins(oauth_server) == before  # still the same token: reused
    await trio.sleep(2)  # past half the token's life: mailgate refreshes it
    await _imap_session(gate)
    assert _logins(oauth_server) - before == 1


async def test_a_revoked_and_reauthorized_grant_means_a_fresh_login(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    lab_user: str,
) -> None:
    """The grant a pooled connection's token came from is revoked at the identity provider and
    the account authorized again: the next session logs in with a token of the new grant.
    (An account of its own: the grant revoked here must not be the other tests'.)"""
    gate = await start_gate(nursery, tmp_path, lab, oauth_server, lab_user)
    await _imap_session(gate)
    before = _logins(oauth_server)
    await _imap_session(gate)
    assert _logins(oauth_server) == before
    oauth_server.revoke(gate.refresh_token)
    _, refresh = oauth_server.issue_tokens(gate.upstream_user)
    await seed_account(gate.config, refresh)  # mailgate authorize, as the admin runs it
    (select,) = await _imap_session(gate, b"S SELECT INBOX")
    assert select[-1].startswith(b"S OK")
    assert _logins(oauth_server) - before == 1


async def test_sighup_changing_the_account_means_a_fresh_login(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    pop3_seeded: SeededState,
) -> None:
    gate = await start_pop_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded)
    await _pop_poll(gate)
    before = _logins(oauth_server)
    await _pop_poll(gate)
    assert _logins(oauth_server) == before
    # The same config with the user's delete mode changed, through the SIGHUP path.
    raw = gate.config.model_dump(mode="json", by_alias=True, exclude={"path"})
    path = write_config(tmp_path, _toml(raw, gate.mailbox, oauth_server.client_secret or ""))
    assert reload(gate.server, path)
    await _pop_poll(gate)
    assert _logins(oauth_server) - before == 1


async def test_pool_size_zero_turns_the_pool_off(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    seeded_state: SeededState,
) -> None:
    gate = await start_seeded_gate(nursery, tmp_path, lab, oauth_server, seeded_state,
                                   upstream_pool_size=0)
    before = _logins(oauth_server)
    for _ in range(3):
        await _imap_session(gate, b"S SELECT INBOX")
    assert _logins(oauth_server) - before == 3


def _toml(raw: dict[str, object], mailbox: str, client_secret: str) -> str:
    """A TOML text for the parts of a dumped config this test needs (keys that hold defaults
    are left out)."""
    import json

    def value(v: object) -> str:
        return json.dumps(v)

    lines = []
    server = raw["server"]
    assert isinstance(server, dict)
    lines.append("[server]")
    lines += [f"hostname = {value(server['hostname'])}", f"state_dir = {value(server['state_dir'])}"]
    lines.append("[admin]\nenabled = false")
    for listener in raw["listener"]:  # type: ignore[attr-defined]
        lines.append("[[listener]]")
        lines += [f"{k} = {value(listener[k])}" for k in ("protocol", "bind", "tls")]
        if listener.get("plaintext_auth_from"):
            lines.append(f"plaintext_auth_from = {value(listener['plaintext_auth_from'])}")
    providers = raw["providers"]
    assert isinstance(providers, dict)
    lab = providers["lab"]
    lines.append("[providers.lab]")
    for k in ("imap", "imap_tls", "ca_file", "sasl", "flow", "authorize_url", "token_url",
              "scopes", "client_id"):
        lines.append(f"{k} = {value(lab[k])}")
    lines.append(f"client_secret = {value(client_secret)}")
    users = raw["users"]
    assert isinstance(users, dict)
    for name, user in users.items():
        lines.append(f"[users.{value(name)}]")
        lines += [f"provider = {value(user['provider'])}",
                  f"upstream_user = {value(user['upstream_user'])}",
                  f"pop3_mailbox = {value(mailbox)}", 'pop3_delete = "keep"']
    limits = raw["limits"]
    assert isinstance(limits, dict)
    lines.append("[limits]")
    lines += [f"{k} = {value(limits[k])}" for k in ("auth_failure_delay", "token_request_timeout",
                                                      "upstream_connect_timeout")]
    return "\n".join(lines) + "\n"
