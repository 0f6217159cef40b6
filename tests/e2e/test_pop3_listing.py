"""The POP3 listing remembered across sessions, against the lab Dovecot: a later session shows
exactly the mailbox as it is, asks for what changed only, and never gives a UIDL to another
message (gateway/frontends/pop3_listing.py)."""

from __future__ import annotations

from pathlib import Path

import trio

from gateway.frontends.pop3_listing import ListingFiles
from gateway.frontends.pop3_mapping import STATE_SUBDIR
from tests.fixtures.imap import USER, SeededState
from tests.fixtures.pop3 import PopGate, start_pop_gate
from tests.lab import LabDovecot, LabOAuthServer, seed


async def _listing(gate: PopGate) -> tuple[list[tuple[int, str]], list[tuple[int, int]]]:
    wire = await gate.login()
    uidl = await wire.listing("UIDL")
    sizes = await wire.listing("LIST")
    assert (await wire.command("QUIT")).startswith(b"+OK")
    await wire.aclose()
    return uidl, [(n, int(s)) for n, s in sizes]


def _direct(gate: PopGate, *commands: bytes) -> None:
    with seed.imap_session(gate.lab, gate.upstream_user) as imap:
        for cmd in commands:
            imap.command(cmd)


def _remembered(gate: PopGate) -> list[int]:
    listing = ListingFiles(gate.config.server.state_dir / STATE_SUBDIR).load(USER)
    assert listing is not None
    return [uid for uid, _, _ in listing.messages]


async def test_added_expunged_and_reappended_messages(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    pop3_seeded: SeededState,
) -> None:
    gate = await start_pop_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded)
    bodies = [b"Subject: m%d\r\n\r\n%s\r\n" % (i, b"x" * (10 + i)) for i in range(4)]
    uids = [await gate.append(raw) for raw in bodies]
    first, sizes = await _listing(gate)
    assert [u[:8] for _, u in first] == [f"{uid:08x}" for uid in uids]  # Dovecot's %08Xu%08Xv
    assert [s for _, s in sizes] == [len(raw) for raw in bodies]
    assert _remembered(gate) == uids

    # Unchanged: the same answer.
    assert await _listing(gate) == (first, sizes)

    # Another client expunges message 2 and appends a new one; the expunged one comes back
    # as a new message (a new UID): it must get a new UIDL, never the old one.
    mailbox = gate.mailbox.encode()
    await trio.to_thread.run_sync(lambda: _direct(
        gate, b'SELECT "' + mailbox + b'"', b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % uids[1],
        b"UID EXPUNGE %d" % uids[1]))
    new = await gate.append(b"Subject: new\r\n\r\nnew body\r\n")
    again = await gate.append(bodies[1])
    uidl, sizes2 = await _listing(gate)
    old_uidls = dict((uid, u) for uid, (_, u) in zip(uids, first))
    assert [u for _, u in uidl] == [old_uidls[uids[0]], old_uidls[uids[2]], old_uidls[uids[3]],
                                   *[u for _, u in uidl[3:]]]
    assert len(uidl) == 5
    assert old_uidls[uids[1]] not in [u for _, u in uidl]
    assert [s for _, s in sizes2] == [len(bodies[0]), len(bodies[2]), len(bodies[3]),
                                      len(b"Subject: new\r\n\r\nnew body\r\n"), len(bodies[1])]
    assert _remembered(gate) == [uids[0], uids[2], uids[3], new, again]
    # The same as Dovecot's own UIDL for these messages (same UIDs, same format).
    assert len({u for _, u in uidl}) == 5


async def test_expunge_only_and_deleting_through_mailgate(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    pop3_seeded: SeededState,
) -> None:
    """An expunge by another client with nothing added (UIDNEXT unchanged, EXISTS smaller), and
    deletions through mailgate itself."""
    gate = await start_pop_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded)
    uids = [await gate.append(b"Subject: %d\r\n\r\nbody\r\n" % i) for i in range(3)]
    await _listing(gate)
    mailbox = gate.mailbox.encode()
    await trio.to_thread.run_sync(lambda: _direct(
        gate, b'SELECT "' + mailbox + b'"', b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % uids[0],
        b"UID EXPUNGE %d" % uids[0]))
    uidl, _ = await _listing(gate)
    assert len(uidl) == 2 and _remembered(gate) == uids[1:]
    wire = await gate.login()
    assert (await wire.command("DELE 1")).startswith(b"+OK")
    assert (await wire.command("QUIT")).startswith(b"+OK")
    await wire.aclose()
    assert _remembered(gate) == uids[2:] == await gate.uids()
    uidl, _ = await _listing(gate)
    assert len(uidl) == 1


async def test_a_new_uidvalidity_discards_the_listing(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
    pop3_seeded: SeededState,
) -> None:
    gate = await start_pop_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded)
    for i in range(2):
        await gate.append(b"Subject: %d\r\n\r\nbody\r\n" % i)
    before, _ = await _listing(gate)
    mailbox = gate.mailbox.encode()
    # Recreated: a new UIDVALIDITY, and the UIDs start again at 1 -- for other messages.
    await trio.to_thread.run_sync(lambda: _direct(
        gate, b'DELETE "' + mailbox + b'"', b'CREATE "' + mailbox + b'"'))
    for i in range(2):
        await gate.append(b"Subject: other %d\r\n\r\nanother body\r\n" % i)
    after, sizes = await _listing(gate)
    assert len(after) == 2
    assert not {u for _, u in before} & {u for _, u in after}
    assert [s for _, s in sizes] == [len(b"Subject: other 0\r\n\r\nanother body\r\n")] * 2
