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

from gateway.frontends.pop3_listing import Pop3StateFiles
from gateway.frontends.pop3_mapping import (
    STRUCTURE_BATCH,
    CommitRefused,
    Maildrop,
    MaildropLock,
    SizeCache,
    binary_is_verbatim,
    default_uidl,
    gmail_uidl,
    valid_uidl,
)
from gateway.frontends.pop3_session import Pop3Session
from gateway.protocol import pop3
from gateway.protocol.imap_responses import ResponseFramer
from gateway.protocol.imap_responses import FetchItems
from gateway.upstream.client import MessageVanished, UnsafeExpunge, UpstreamResponse
from gateway.upstream.mailbox import fetch_results


@dataclass
class Info:
    exists: int
    uidvalidity: int
    name: str = "INBOX"
    uidnext: int | None = None


@dataclass
class RecordingUpstream:
    capabilities: frozenset[str]
    sizes: list[tuple[int, int]]
    uidvalidity: int = 7
    trash: str | None = "Trash"
    gm_ids: dict[int, int] = field(default_factory=dict)
    extra: bytes = b""  # something a server might add to each FETCH answer, e.g. b" FLAGS ()"
    structures: dict[int, Any] = field(default_factory=dict)  # uid -> parsed BODYSTRUCTURE
    refuse_binary: bool = False  # answer a BINARY fetch like a server refusing it
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    async def fetch_all(self, items: tuple[bytes, ...]) -> list[FetchItems]:
        """Answers the snapshot's UID FETCH with real wire bytes, read by the real reader."""
        self.calls.append(("fetch_all", items))
        gmail = b"X-GM-MSGID" in items
        wire = b"".join(
            b"* %d FETCH (UID %d RFC822.SIZE %d%s%s)\r\n"
            % (seq, uid, size, b" X-GM-MSGID %d" % self.gm_ids[uid] if gmail else b"", self.extra)
            for seq, (uid, size) in enumerate(self.sizes, start=1)
        ) + b"M1 OK Fetch completed.\r\n"
        events = ResponseFramer().feed(wire)
        return fetch_results(UpstreamResponse("UID FETCH", events[-1], events[:-1]))

    async def select(self, mailbox: str) -> Info:
        self.calls.append(("select", mailbox))
        return Info(len(self.sizes), self.uidvalidity)

    async def fetch_sizes(self) -> list[tuple[int, int]]:
        self.calls.append(("fetch_sizes",))
        return list(self.sizes)

    async def fetch_attrs(self, uids: list[int], attrs: bytes) -> dict[int, FetchItems]:
        self.calls.append(("fetch_attrs", list(uids), attrs))
        if attrs == b"BODYSTRUCTURE":
            return {uid: {attrs: self.structures[uid]} for uid in uids if uid in self.structures}
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
        self.calls.append(("stream_body", uid, section))
        if self.refuse_binary and section.startswith(b"BINARY"):
            raise MessageVanished("NO Unknown Content-Transfer-Encoding")

        async def chunks():  # type: ignore[no-untyped-def]
            yield b"Subject: x\n\nbody\n"
        yield chunks()


async def open_drop(tmp_path: Path, upstream: RecordingUpstream, mode: str = "expunge") -> Maildrop:
    return await Maildrop.open(upstream, mailbox="INBOX", delete_mode=mode,
                               size_cache=SizeCache(Pop3StateFiles(tmp_path), "a"))


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


async def test_a_refused_expunge_in_the_client_is_a_refused_commit(tmp_path: Path) -> None:
    """Should the client refuse (UIDPLUS gone, say), QUIT says why and deletes nothing."""
    up = RecordingUpstream(frozenset({"UIDPLUS"}), [(1, 10)])
    drop = await open_drop(tmp_path, up)

    async def refuse(uids: list[int]) -> None:
        raise UnsafeExpunge("upstream lacks UIDPLUS: nothing was changed")

    up.uid_expunge = refuse  # type: ignore[method-assign]
    drop.delete(1)
    with pytest.raises(CommitRefused, match="lacks UIDPLUS"):
        await drop.commit()


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


async def test_snapshot_reads_plain_answers_and_anything_else_through_the_one_reader(
    tmp_path: Path,
) -> None:
    sizes = [(2, 10), (4, 20), (9, 30)]
    fast = RecordingUpstream(frozenset(), sizes)
    drop = await open_drop(tmp_path, fast)
    assert [(m.number, m.uid, m.size) for m in drop.messages] == [(1, 2, 10), (2, 4, 20), (3, 9, 30)]
    assert [c for c in fast.calls if c[0] == "fetch_all"] == [("fetch_all", (b"UID", b"RFC822.SIZE"))]
    for extra in (b" FLAGS (\\Seen)", b' BODY[HEADER.FIELDS (X)] {3}\r\nX:\n', b" MODSEQ (12)"):
        odd = RecordingUpstream(frozenset(), sizes, extra=extra)
        drop = await open_drop(tmp_path, odd)
        assert [(m.uid, m.size) for m in drop.messages] == sizes
        assert len([c for c in odd.calls if c[0] == "fetch_all"]) == 1


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
    cache = SizeCache(Pop3StateFiles(tmp_path), "a")
    await cache.load()
    assert cache.get(7, 4) is None


async def test_damaged_size_cache_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "a.sizes.json").write_text("{not json")
    drop = await open_drop(tmp_path, RecordingUpstream(frozenset(), [(1, 42)]))
    assert drop.stat() == (1, 42)


# BODYSTRUCTUREs as the upstream client parses them (a multipart's parts come as one list).
TEXT_7BIT = (b"text", b"plain", (b"charset", b"us-ascii"), None, None, b"7bit", 21, 2, None, None, None, None)
TEXT_8BIT = (b"TEXT", b"PLAIN", None, None, None, b"8BIT", 3, 0, None, None, None, None)
BASE64 = (b"application", b"octet-stream", None, None, None, b"base64", 10, None, None, None, None)
QP = (b"text", b"plain", None, None, None, b"quoted-printable", 10, 1, None, None, None, None)
UUENCODE = (b"text", b"plain", None, None, None, b"x-uuencode", 28, 4, None, None, None, None)
ENVELOPE = (None, b"inner", None, None, None, None, None, None, None, None)


def rfc822(inner: Any, encoding: bytes = b"7bit") -> tuple[Any, ...]:
    return (b"message", b"rfc822", None, None, None, encoding, 129, ENVELOPE, inner, 7, None, None, None, None)


def multipart(*parts: Any) -> tuple[Any, ...]:
    return (list(parts), b"mixed", (b"boundary", b"b"), None, None, None)


def test_binary_is_verbatim_only_when_every_part_has_an_identity_encoding() -> None:
    verbatim = [
        TEXT_7BIT,
        TEXT_8BIT,
        (b"application", b"octet-stream", None, None, None, b"binary", 5, None, None, None, None),
        multipart(TEXT_7BIT, TEXT_8BIT),
        rfc822(TEXT_8BIT),
        multipart(TEXT_7BIT, rfc822(multipart(TEXT_8BIT, TEXT_7BIT))),
        # a multipart written as leading part sequences: the parameter list is not a part
        (TEXT_7BIT, TEXT_8BIT, b"mixed", (b"boundary", b"b"), None, None, None),
    ]
    for structure in verbatim:
        assert binary_is_verbatim(structure), structure
    decoded_or_unknown = [
        BASE64,
        QP,
        UUENCODE,  # BINARY refuses it (RFC 3516 UNKNOWN-CTE)
        multipart(TEXT_7BIT, BASE64),
        rfc822(BASE64),  # BINARY decodes inside an enclosed message too
        multipart(TEXT_7BIT, rfc822(multipart(TEXT_8BIT, QP))),
        (TEXT_7BIT, BASE64, b"mixed", None),
        (b"text", b"plain", None, None, None, None, 3, 0),  # NIL encoding
        rfc822(None),
        (b"text", b"plain"),  # too short
        (),
        None,
        b"7bit",
    ]
    for structure in decoded_or_unknown:
        assert not binary_is_verbatim(structure), structure


def sections(upstream: RecordingUpstream) -> list[tuple[int, bytes]]:
    return [(c[1], c[2]) for c in upstream.calls if c[0] == "stream_body"]


async def test_binary_fetch_where_the_upstream_has_it_and_it_is_the_stored_message(tmp_path: Path) -> None:
    up = RecordingUpstream(frozenset({"BINARY"}), [(uid, 20) for uid in range(1, 4 + STRUCTURE_BATCH)],
                           structures={1: TEXT_7BIT, 2: multipart(TEXT_8BIT, BASE64), 3: rfc822(TEXT_8BIT)})
    drop = await open_drop(tmp_path, up)
    drop.delete(2)

    async def sink(data: bytes) -> None:
        pass

    await drop.send(1, sink)
    # One BODYSTRUCTURE fetch for this message and the next ones not marked deleted.
    batch = [1] + list(range(3, 2 + STRUCTURE_BATCH))
    assert [c for c in up.calls if c[0] == "fetch_attrs"] == [("fetch_attrs", batch, b"BODYSTRUCTURE")]
    drop.reset()
    await drop.send(2, sink)  # not asked yet (it was marked): with those still unknown
    await drop.send(3, sink, top_lines=1)
    await drop.send(4, sink)  # no BODYSTRUCTURE in the answer: BODY[]
    await drop.send(3 + STRUCTURE_BATCH, sink)
    assert [c[1] for c in up.calls if c[0] == "fetch_attrs"][1:] == [
        [2, 2 + STRUCTURE_BATCH, 3 + STRUCTURE_BATCH]
    ]
    assert sections(up) == [(1, b"BINARY.PEEK[]"), (2, b"BODY.PEEK[]"), (3, b"BINARY.PEEK[]"),
                            (4, b"BODY.PEEK[]"), (3 + STRUCTURE_BATCH, b"BODY.PEEK[]")]

    plain = RecordingUpstream(frozenset({"UIDPLUS"}), [(1, 20)], structures={1: TEXT_7BIT})
    drop = await open_drop(tmp_path, plain)
    await drop.send(1, sink)
    assert sections(plain) == [(1, b"BODY.PEEK[]")]
    assert not [c for c in plain.calls if c[0] == "fetch_attrs"]


async def test_a_refused_binary_fetch_is_retried_with_body(tmp_path: Path) -> None:
    up = RecordingUpstream(frozenset({"BINARY"}), [(1, 20)], structures={1: TEXT_7BIT}, refuse_binary=True)
    drop = await open_drop(tmp_path, up)
    sent: list[bytes] = []

    async def sink(data: bytes) -> None:
        sent.append(data)

    await drop.send(1, sink)
    assert b"".join(sent) == b"+OK 20 octets\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
    await drop.send(1, sink, top_lines=0)  # remembered: no second BINARY attempt
    assert sections(up) == [(1, b"BINARY.PEEK[]"), (1, b"BODY.PEEK[]"), (1, b"BODY.PEEK[]")]


def test_every_command_the_parser_accepts_has_a_handler() -> None:
    assert set(Pop3Session.HANDLERS) == pop3.KNOWN_COMMANDS - {"APOP"}
    assert set(Pop3Session.HANDLERS) == set().union(*pop3.ALLOWED.values())


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



class ListingUpstream(RecordingUpstream):
    """A RecordingUpstream whose SELECT tells UIDNEXT and which answers UID SEARCH ALL and a
    UID FETCH of given UIDs."""

    async def select(self, mailbox: str) -> Info:  # type: ignore[override]
        self.calls.append(("select", mailbox))
        uidnext = max((uid for uid, _ in self.sizes), default=0) + 1
        return Info(len(self.sizes), self.uidvalidity, uidnext=uidnext)

    async def uid_search_all(self) -> set[int]:
        self.calls.append(("search",))
        return {uid for uid, _ in self.sizes}

    async def fetch_attrs(self, uids: list[int], attrs: bytes) -> dict[int, FetchItems]:
        self.calls.append(("fetch_attrs", sorted(uids)))
        sizes = dict(self.sizes)
        return {uid: {b"UID": uid, b"RFC822.SIZE": sizes[uid]} for uid in uids if uid in sizes}


async def test_remembered_listing_costs_no_round_trip_and_then_only_the_changes(
    tmp_path: Path,
) -> None:
    from gateway.frontends.pop3_listing import ListingFiles

    files = ListingFiles(tmp_path / "pop3")

    async def open_remembering(up: RecordingUpstream) -> Maildrop:
        return await Maildrop.open(up, mailbox="INBOX", delete_mode="expunge",
                                   size_cache=SizeCache(Pop3StateFiles(tmp_path), "a"),
                                   listings=files, account="alice")

    first = ListingUpstream(frozenset(), [(2, 10), (4, 20), (9, 30)])
    await open_remembering(first)
    assert [c[0] for c in first.calls] == ["select", "fetch_all"]
    same = ListingUpstream(frozenset(), [(2, 10), (4, 20), (9, 30)])
    drop = await open_remembering(same)
    assert [c[0] for c in same.calls] == ["select"]  # EXISTS and UIDNEXT unchanged: nothing asked
    assert [(m.uid, m.size) for m in drop.messages] == [(2, 10), (4, 20), (9, 30)]
    # UID 4 expunged elsewhere, 11 and 12 added: one search, sizes of the new ones only.
    changed = ListingUpstream(frozenset(), [(2, 10), (9, 30), (11, 5), (12, 6)])
    drop = await open_remembering(changed)
    assert [c for c in changed.calls if c[0] != "select"] == [("search",), ("fetch_attrs", [11, 12])]
    assert [(m.number, m.uid, m.size) for m in drop.messages] == [
        (1, 2, 10), (2, 9, 30), (3, 11, 5), (4, 12, 6)]
    # A new UIDVALIDITY: the whole listing again.
    renewed = ListingUpstream(frozenset(), [(1, 7)], uidvalidity=99)
    drop = await open_remembering(renewed)
    assert [c[0] for c in renewed.calls] == ["select", "fetch_all"]
    assert [m.uidl for m in drop.messages] == ["0000000100000063"]
    # A damaged file is ignored (and rebuilt).
    (tmp_path / "pop3" / "alice.listing.json").write_text("{not json")
    again = ListingUpstream(frozenset(), [(1, 7)], uidvalidity=99)
    await open_remembering(again)
    assert [c[0] for c in again.calls] == ["select", "fetch_all"]
    assert files.load("alice") is not None
