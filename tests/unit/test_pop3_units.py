"""Unit tests of the POP3 mapping's decisions that the lab Dovecot cannot provoke.

Dovecot always offers UIDPLUS and MOVE and has no X-GM-EXT-1, so the commit refusals and
Gmail UIDLs are exercised here against a recording stand-in for the upstream client (the
mapping is the code under test; the stand-in only answers the calls it makes).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.frontends.pop3_mapping import (
    CommitRefused,
    Maildrop,
    MaildropLock,
    SizeCache,
    default_uidl,
    gmail_uidl,
    valid_uidl,
)
from gateway.protocol import pop3
from gateway.protocol.imap_responses import ResponseFramer
from gateway.upstream.client import UpstreamResponse


@dataclass
class Info:
    exists: int
    uidvalidity: int


@dataclass
class RecordingUpstream:
    capabilities: frozenset[str]
    sizes: list[tuple[int, int]]
    uidvalidity: int = 7
    trash: str | None = "Trash"
    gm_ids: dict[int, int] = field(default_factory=dict)
    extra: bytes = b""  # something a server might add to each FETCH answer, e.g. b" FLAGS ()"
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    async def command(self, cmd: bytes) -> UpstreamResponse:
        """Answers the snapshot's UID FETCH with real wire bytes, framed by the real framer."""
        self.calls.append(("command", cmd))
        gmail = b"X-GM-MSGID" in cmd
        wire = b"".join(
            b"* %d FETCH (UID %d RFC822.SIZE %d%s%s)\r\n"
            % (seq, uid, size, b" X-GM-MSGID %d" % self.gm_ids[uid] if gmail else b"", self.extra)
            for seq, (uid, size) in enumerate(self.sizes, start=1)
        ) + b"M1 OK Fetch completed.\r\n"
        events = ResponseFramer().feed(wire)
        return UpstreamResponse(cmd.decode(), events[-1], events[:-1])

    async def select(self, mailbox: str) -> Info:
        self.calls.append(("select", mailbox))
        return Info(len(self.sizes), self.uidvalidity)

    async def fetch_sizes(self) -> list[tuple[int, int]]:
        self.calls.append(("fetch_sizes",))
        return list(self.sizes)

    async def fetch_attrs(self, uids: list[int], attrs: bytes) -> dict[int, dict[bytes, Any]]:
        assert attrs == b"X-GM-MSGID"
        return {uid: {b"X-GM-MSGID": self.gm_ids[uid]} for uid in uids if uid in self.gm_ids}

    async def find_special_use(self, attr: str) -> str | None:
        return self.trash

    async def uid_store(self, uids: list[int], flags_op: bytes) -> None:
        self.calls.append(("store", list(uids), flags_op))

    async def uid_expunge(self, uids: list[int]) -> None:
        self.calls.append(("expunge", list(uids)))

    async def uid_move(self, uids: list[int], mailbox: str) -> None:
        self.calls.append(("move", list(uids), mailbox))

    @asynccontextmanager
    async def stream_body(self, uid: int, section: bytes, partial: Any = None):  # type: ignore[no-untyped-def]
        async def chunks():  # type: ignore[no-untyped-def]
            yield b"Subject: x\n\nbody\n"
        yield chunks()


async def open_drop(tmp_path: Path, upstream: RecordingUpstream, mode: str = "expunge") -> Maildrop:
    return await Maildrop.open(upstream, mailbox="INBOX", delete_mode=mode,
                               size_cache=SizeCache(tmp_path / "sizes.json"))


def mutations(upstream: RecordingUpstream) -> list[tuple[Any, ...]]:
    return [c for c in upstream.calls if c[0] in ("store", "expunge", "move")]


async def test_expunge_uses_uid_store_then_uid_expunge_of_exactly_the_marked(tmp_path: Path) -> None:
    up = RecordingUpstream(frozenset({"UIDPLUS", "MOVE"}), [(3, 10), (5, 20), (9, 30)])
    drop = await open_drop(tmp_path, up)
    drop.delete(1)
    drop.delete(3)
    assert await drop.commit() == "Logging out, 2 messages deleted"
    assert mutations(up) == [("store", [3, 9], rb"+FLAGS.SILENT (\Deleted)"), ("expunge", [3, 9])]


async def test_without_uidplus_moves_to_trash_or_refuses(tmp_path: Path) -> None:
    up = RecordingUpstream(frozenset({"MOVE"}), [(1, 10)])
    drop = await open_drop(tmp_path, up)
    drop.delete(1)
    await drop.commit()
    assert mutations(up) == [("move", [1], "Trash")]

    up = RecordingUpstream(frozenset(), [(1, 10)])
    drop = await open_drop(tmp_path, up)
    drop.delete(1)
    with pytest.raises(CommitRefused, match="UIDPLUS"):
        await drop.commit()
    assert mutations(up) == []


async def test_trash_mode_needs_a_trash_mailbox(tmp_path: Path) -> None:
    up = RecordingUpstream(frozenset({"UIDPLUS", "MOVE"}), [(1, 10)], trash=None)
    drop = await open_drop(tmp_path, up, "trash")
    drop.delete(1)
    with pytest.raises(CommitRefused, match="Trash"):
        await drop.commit()
    assert mutations(up) == []


async def test_keep_mode_and_nothing_marked(tmp_path: Path) -> None:
    up = RecordingUpstream(frozenset({"UIDPLUS"}), [(1, 10), (2, 10)])
    drop = await open_drop(tmp_path, up, "keep")
    assert await drop.commit() == "Logging out"
    drop.delete(2)
    await drop.commit()
    assert mutations(up) == [("store", [2], rb"+FLAGS.SILENT (\Seen)")]


async def test_gmail_uidl_survives_a_uidvalidity_change(tmp_path: Path) -> None:
    caps = frozenset({"UIDPLUS", "X-GM-EXT-1"})
    first = await open_drop(tmp_path, RecordingUpstream(caps, [(1, 5)], uidvalidity=1, gm_ids={1: 0x1A2B3C}))
    again = await open_drop(tmp_path, RecordingUpstream(caps, [(8, 5)], uidvalidity=2, gm_ids={8: 0x1A2B3C}))
    assert first.messages[0].uidl == again.messages[0].uidl == "GmailId1a2b3c"
    plain = await open_drop(tmp_path, RecordingUpstream(frozenset(), [(1, 5)], uidvalidity=1))
    assert plain.messages[0].uidl == "0000000100000001"


async def test_snapshot_reads_plain_answers_fast_and_anything_else_with_the_full_parser(
    tmp_path: Path,
) -> None:
    sizes = [(2, 10), (4, 20), (9, 30)]
    fast = RecordingUpstream(frozenset(), sizes)
    drop = await open_drop(tmp_path, fast)
    assert [(m.number, m.uid, m.size) for m in drop.messages] == [(1, 2, 10), (2, 4, 20), (3, 9, 30)]
    assert ("fetch_sizes",) not in fast.calls
    odd = RecordingUpstream(frozenset(), sizes, extra=b" FLAGS (\\Seen)")
    drop = await open_drop(tmp_path, odd)
    assert [(m.uid, m.size) for m in drop.messages] == sizes
    assert ("fetch_sizes",) in odd.calls


async def test_size_cache_roundtrip_and_pruning(tmp_path: Path) -> None:
    up = RecordingUpstream(frozenset({"UIDPLUS"}), [(4, 99)])
    drop = await open_drop(tmp_path, up)
    sent: list[bytes] = []

    async def sink(data: bytes) -> None:
        sent.append(data)

    await drop.send(1, sink)
    assert b"".join(sent) == b"+OK 99 octets\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
    assert drop.messages[0].size == 20
    assert mutations(up) == []  # \Seen is stored once, at the end of the session
    await drop.flush_seen()
    assert mutations(up) == [("store", [4], rb"+FLAGS.SILENT (\Seen)")]
    again = await open_drop(tmp_path, RecordingUpstream(frozenset(), [(4, 99)]))
    assert again.stat() == (1, 20)
    # A new UIDVALIDITY makes the remembered size meaningless: it is dropped.
    await open_drop(tmp_path, RecordingUpstream(frozenset(), [(4, 99)], uidvalidity=8))
    cache = SizeCache(tmp_path / "sizes.json")
    await cache.load()
    assert cache.get(7, 4) is None


async def test_damaged_size_cache_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "sizes.json").write_text("{not json")
    drop = await open_drop(tmp_path, RecordingUpstream(frozenset(), [(1, 42)]))
    assert drop.stat() == (1, 42)


def test_maildrop_lock_is_exclusive(tmp_path: Path) -> None:
    first = MaildropLock(tmp_path, "alice/../x y")
    second = MaildropLock(tmp_path, "alice/../x y")
    assert first.acquire()
    assert first.path.parent == tmp_path / "pop3"
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()


@given(st.integers(0, 2**32 - 1), st.integers(1, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_uidls_are_valid(uidvalidity: int, uid: int, msgid: int) -> None:
    assert valid_uidl(default_uidl(uidvalidity, uid))
    assert valid_uidl(gmail_uidl(msgid))


@given(st.binary(max_size=200))
def test_sasl_decoding_only_raises_its_own_error(data: bytes) -> None:
    try:
        pop3.decode_plain(pop3.decode_base64(data))
    except pop3.SaslError:
        pass
