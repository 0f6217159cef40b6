"""The translation of a POP3 maildrop onto one upstream IMAP mailbox.

Theory of operation
===================

A :class:`Maildrop` is what a POP3 session sees after login. It keeps RFC 1939's rules on
top of IMAP:

* **Snapshot at login.** :meth:`Maildrop.open` SELECTs the user's ``pop3_mailbox``
  (INBOX unless configured) and takes every message's UID and RFC822.SIZE (plus X-GM-MSGID
  on Gmail) from the listing remembered from the last session, asking the upstream only
  what changed (:mod:`gateway.frontends.pop3_listing`: nothing when EXISTS and UIDNEXT are
  unchanged), or in one ``UID FETCH 1:* (UID RFC822.SIZE)`` when nothing usable is
  remembered. Message numbers 1..N refer to that snapshot for
  the whole session; mail arriving meanwhile waits for the next session, mail removed by
  another client answers ``-ERR`` for its number while the session goes on.
* **DELE only marks.** DELE and RSET change nothing upstream. Marked messages drop out of
  STAT, LIST and UIDL, and any command naming one gets ``-ERR``.
* **Only QUIT in TRANSACTION changes the mailbox** (:meth:`Maildrop.commit`). With
  ``pop3_delete = "expunge"`` (default) it runs ``UID STORE <uids> +FLAGS.SILENT
  (\\Deleted)`` then ``UID EXPUNGE <uids>`` (UIDPLUS, RFC 4315) for exactly the marked
  UIDs, so a message another client flagged \\Deleted is never expunged by mailgate.
  Without UIDPLUS it moves the messages to the \\Trash special-use mailbox when the server
  has MOVE and one, and otherwise refuses (nothing is deleted, QUIT says so); the upstream
  client itself also refuses an expunge without UIDPLUS (``UnsafeExpunge``), which
  :meth:`Maildrop.commit` reports the same way.
  ``"trash"`` moves them to \\Trash (how a delete really deletes on Gmail, where expunging
  from INBOX only archives); ``"keep"`` only marks them \\Seen. A session that ends any
  other way (dropped connection, timeout, upstream failure, QUIT before login) never
  reaches :meth:`Maildrop.commit`, so nothing is deleted.
* **\\Seen on RETR, not TOP.** RETR fetches ``BODY.PEEK[]`` (or ``BINARY.PEEK[]``, below);
  once the whole message went out its UID is noted, and :meth:`Maildrop.flush_seen`
  stores ``+FLAGS.SILENT (\\Seen)`` for all of them in one command at QUIT, or when the
  session ends any other way while the upstream still answers (as Dovecot does: no round
  trip per RETR, which matters on a distant provider). TOP never marks.
* **Streaming.** Bodies flow chunk by chunk from the upstream literal through the sans-IO
  :class:`~gateway.protocol.pop3.MessageEncoder` to the client; no message is held in
  memory. TOP of a big message reads it in growing ``.PEEK[]<offset.length>`` windows
  and stops as soon as the header and *k* body lines are out.
* **NUL bytes and BINARY.** An IMAP literal cannot carry a NUL byte, so ``BODY[]`` of a
  message that contains one is not the stored message (Dovecot sends 0x80 instead, where
  its own POP3 server sends the NUL). When the upstream has BINARY (RFC 3516), RETR and
  TOP fetch ``BINARY.PEEK[]`` instead, whose literal8 (``~{n}``) carries any octet, but
  only for a message whose every MIME part has an identity Content-Transfer-Encoding
  (7bit, 8bit or binary, RFC 2045 §6.2, nested ``message/rfc822`` parts included): BINARY
  decodes base64 and quoted-printable parts (and renames their encoding), so for any
  other message it is not the stored message either, and ``BODY.PEEK[]`` is used. That
  is learned from ``BODYSTRUCTURE``, asked for :data:`STRUCTURE_BATCH` messages at a time
  (the one wanted and those after it: clients download in order), so it costs one round
  trip per batch. A BINARY fetch the server refuses is retried once with ``BODY.PEEK[]``.
  Both give the same number of octets, so the sizes are the same either way.
* **UIDL** is unique and stable across sessions, 1-70 characters of 0x21-0x7E: Dovecot's
  default ``%08Xu%08Xv`` form (UID, then UIDVALIDITY, 8 lower-case hex digits each, the
  same value Dovecot's own POP3 server gives) or, when the server has X-GM-EXT-1 (Gmail),
  ``GmailId`` + the hex X-GM-MSGID, which survives a UIDVALIDITY change.
* **Sizes.** POP3 sizes must be the octets RETR sends (CRLF line ends, before
  byte-stuffing). IMAP's RFC822.SIZE is meant to be exactly that (RFC 9051 §2.3.4), but
  some servers get it wrong. Every complete RETR measures the real count; when it
  differs, the session's listing is corrected and the value is remembered per
  (UIDVALIDITY, UID) (:class:`SizeCache`: a small file under ``state_dir/pop3/``, or a row
  of the PostgreSQL store with ``[store] url``) so later sessions report the exact size from the start. *Remaining edge:* a message whose
  RFC822.SIZE is wrong and that was never downloaded through mailgate is listed with the
  server's figure until its first RETR. (The final CRLF added to a message that lacks one
  is part of the terminator and not counted, as with Dovecot.)
* **One POP3 session per account** (RFC 1939 §8's exclusive-access lock):
  :class:`MaildropLock` is an ``flock`` on ``state_dir/pop3/<account>.lock``, held from
  login to the end of the session; a second session gets ``-ERR [IN-USE]``.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..errors import MailgateError
from ..protocol import pop3
from ..upstream.client import CommandFailed, MessageVanished, UnsafeExpunge, UpstreamIMAP
from .pop3_listing import Listing, refresh_listing

if TYPE_CHECKING:
    from ..ports import Pop3ListingStore, Pop3StateStore

log = logging.getLogger("mailgate.pop3")

#: TOP of a message larger than this reads it in windows instead of fetching it whole.
TOP_FIRST_WINDOW = 64 * 1024
#: Largest window TOP asks for (windows double from TOP_FIRST_WINDOW up to this).
TOP_MAX_WINDOW = 1024 * 1024
#: At most this many exact sizes are remembered per account.
MAX_SIZE_CACHE_ENTRIES = 100_000
#: The kind of :class:`gateway.ports.Pop3StateStore` text holding the exact sizes.
SIZES = "sizes"
#: Sub-directory of ``state_dir`` holding the size caches and locks.
STATE_SUBDIR = "pop3"
#: The UIDL prefix for Gmail's X-GM-MSGID.
GMAIL_UIDL_PREFIX = "GmailId"
#: BODYSTRUCTURE is asked for this many messages at a time (BINARY upstreams only).
STRUCTURE_BATCH = 50

BODY = b"BODY.PEEK[]"
BINARY = b"BINARY.PEEK[]"
#: The Content-Transfer-Encodings BINARY leaves as they are (RFC 2045 §6.2).
IDENTITY_ENCODINGS = frozenset({b"7BIT", b"8BIT", b"BINARY"})

SEEN = rb"+FLAGS.SILENT (\Seen)"
DELETED = rb"+FLAGS.SILENT (\Deleted)"
TRASH = "\\Trash"


class MessageUnavailable(MailgateError):
    """A command named a message that does not exist, is marked deleted or vanished upstream."""


class CommitRefused(MailgateError):
    """QUIT could not apply the deletions (nothing was deleted); ``str()`` says why."""


@dataclass(slots=True)
class Message:
    number: int
    uid: int
    size: int
    uidl: str
    deleted: bool = False


Sink = Callable[[bytes], Awaitable[None]]


# -- per-account state on disk ---------------------------------------------------------


def _state_path(state_dir: Path, account: str, suffix: str) -> Path:
    return state_dir / STATE_SUBDIR / (urllib.parse.quote(account, safe="") + suffix)


class MaildropLock:
    """An exclusive, non-blocking lock on one account's maildrop (across processes too)."""

    def __init__(self, state_dir: Path, account: str) -> None:
        self.path = _state_path(state_dir, account, ".lock")
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> MaildropLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class SizeCache:
    """Exact POP3 sizes per (UIDVALIDITY, UID) for one account, as JSON text of kind
    :data:`SIZES` in a :class:`gateway.ports.Pop3StateStore` (a small file under
    ``state_dir/pop3/``, or a row of the PostgreSQL store).

    Only sizes that differ from the server's RFC822.SIZE are stored, and entries for
    messages no longer in the mailbox are dropped at every session start, so the text
    stays tiny. A damaged or unreadable one is ignored (sizes fall back to RFC822.SIZE).
    """

    def __init__(self, state: Pop3StateStore, account: str) -> None:
        self._state = state
        self._account = account
        self._sizes: dict[str, int] = {}
        self._dirty = False

    @staticmethod
    def _key(uidvalidity: int, uid: int) -> str:
        return f"{uidvalidity}:{uid}"

    async def load(self) -> None:
        self._sizes = await trio.to_thread.run_sync(self._read)

    def _read(self) -> dict[str, int]:
        try:
            text = self._state.pop3_state(self._account, SIZES)
            data = json.loads(text) if text is not None else {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable POP3 size cache of %s: %s", self._account, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, int)}

    def get(self, uidvalidity: int, uid: int) -> int | None:
        return self._sizes.get(self._key(uidvalidity, uid))

    def put(self, uidvalidity: int, uid: int, size: int, *, server_size: int) -> None:
        key = self._key(uidvalidity, uid)
        if size == server_size:
            if self._sizes.pop(key, None) is not None:
                self._dirty = True
            return
        if self._sizes.get(key) != size and len(self._sizes) < MAX_SIZE_CACHE_ENTRIES:
            self._sizes[key] = size
            self._dirty = True

    def __len__(self) -> int:
        return len(self._sizes)

    def retain(self, uidvalidity: int, uids: Iterable[int]) -> None:
        if not self._sizes:
            return
        keep = {self._key(uidvalidity, uid) for uid in uids}
        kept = {k: v for k, v in self._sizes.items() if k in keep}
        if len(kept) != len(self._sizes):
            self._sizes = kept
            self._dirty = True

    async def save(self) -> None:
        if self._dirty:
            self._dirty = False
            await trio.to_thread.run_sync(self._write, dict(self._sizes))

    def _write(self, sizes: dict[str, int]) -> None:
        self._state.save_pop3_state(self._account, SIZES, json.dumps(sizes, separators=(",", ":")))


# -- UIDL --------------------------------------------------------------------------


def default_uidl(uidvalidity: int, uid: int) -> str:
    """Dovecot's default POP3 UIDL, ``%08Xu%08Xv`` (16 hex digits for 32-bit values)."""
    return f"{uid:08x}{uidvalidity:08x}"


def gmail_uidl(msgid: int) -> str:
    return f"{GMAIL_UIDL_PREFIX}{msgid:x}"


def valid_uidl(uidl: str) -> bool:
    return 1 <= len(uidl) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uidl)


# -- BODYSTRUCTURE -----------------------------------------------------------------------


def binary_is_verbatim(structure: object) -> bool:
    """Whether ``BINARY[]`` of a message with this BODYSTRUCTURE is the message as stored.

    True when every part, nested ``message/rfc822`` and ``message/global`` parts included,
    has an identity encoding (:data:`IDENTITY_ENCODINGS`); false for anything else,
    including a structure that is not understood. ``structure`` is the parsed
    BODYSTRUCTURE: a single part is a sequence whose items 0, 1 and 5 are type, subtype
    and encoding and whose item 8 is the enclosed message's structure for
    ``message/rfc822``; a multipart starts with its parts, either as one list or as
    leading sequences.
    """
    pending = [structure]
    while pending:
        part = pending.pop()
        if not isinstance(part, (tuple, list)) or not part:
            return False
        head = part[0]
        if isinstance(head, list):
            pending.extend(head)
            continue
        if isinstance(head, tuple):
            pending.extend(itertools.takewhile(lambda p: isinstance(p, (tuple, list)), part))
            continue
        if len(part) < 7 or not isinstance(part[5], bytes):
            return False
        if part[5].upper() not in IDENTITY_ENCODINGS:
            return False
        kind = head.lower() if isinstance(head, bytes) else b""
        subtype = part[1].lower() if isinstance(part[1], bytes) else b""
        if kind == b"message" and subtype in (b"rfc822", b"global"):
            if len(part) < 9:
                return False
            pending.append(part[8])
    return True


# -- the maildrop -----------------------------------------------------------------------


class Maildrop:
    """The POP3 view of one mailbox for one session (see the module docstring)."""

    def __init__(
        self,
        upstream: UpstreamIMAP,
        *,
        mailbox: str,
        delete_mode: str,
        uidvalidity: int,
        messages: list[Message],
        server_sizes: dict[int, int],
        size_cache: SizeCache,
    ) -> None:
        self._upstream = upstream
        self.mailbox = mailbox
        self.delete_mode = delete_mode
        self.uidvalidity = uidvalidity
        self.messages = messages
        self._server_sizes = server_sizes
        self._sizes = size_cache
        self._retrieved: set[int] = set()  # UIDs fully sent by RETR, not yet marked \Seen
        self._listing: Listing | None = None  # as remembered for the next session
        self._listings: Pop3ListingStore | None = None
        self._account = ""
        self._verbatim: dict[int, bool] = {}  # UID -> BINARY[] is the stored message

    # ------------------------------------------------------------------ opening

    @classmethod
    async def open(
        cls, upstream: UpstreamIMAP, *, mailbox: str, delete_mode: str, size_cache: SizeCache,
        listings: Pop3ListingStore | None = None, account: str = "",
    ) -> Maildrop:
        """SELECT ``mailbox`` and take the snapshot of UIDs, sizes and UIDLs: from the listing
        remembered in ``listings`` and what changed upstream since (:mod:`gateway.frontends.
        pop3_listing`), or all of it."""
        info = await upstream.select(mailbox)
        uidvalidity = int(info.uidvalidity or 0)
        gmail = "X-GM-EXT-1" in upstream.capabilities
        remembered = None
        if listings is not None:
            remembered = await trio.to_thread.run_sync(listings.load, account)
        listing, changed = await refresh_listing(upstream, info, remembered, gmail=gmail)
        if listings is not None and changed:
            await trio.to_thread.run_sync(listings.save, account, listing)
        snapshot = listing.messages
        await size_cache.load()
        size_cache.retain(uidvalidity, (uid for uid, _, _ in snapshot))
        messages = []
        suffix = default_uidl(uidvalidity, 0)[8:]  # the UIDVALIDITY half of every default UIDL
        exact_sizes = len(size_cache) > 0
        for number, (uid, server_size, msgid) in enumerate(snapshot, start=1):
            exact = size_cache.get(uidvalidity, uid) if exact_sizes else None
            uidl = gmail_uidl(msgid) if msgid is not None else f"{uid:08x}{suffix}"
            messages.append(Message(number, uid, server_size if exact is None else exact, uidl))
        await size_cache.save()
        drop = cls(
            upstream,
            mailbox=mailbox,
            delete_mode=delete_mode,
            uidvalidity=uidvalidity,
            messages=messages,
            server_sizes={uid: size for uid, size, _ in snapshot},
            size_cache=size_cache,
        )
        drop._listing, drop._listings, drop._account = listing, listings, account
        return drop

    # ------------------------------------------------------------------ listings

    def get(self, number: int) -> Message:
        if not 1 <= number <= len(self.messages):
            raise MessageUnavailable("No such message")
        message = self.messages[number - 1]
        if message.deleted:
            raise MessageUnavailable("Message is deleted")
        return message

    def visible(self) -> list[Message]:
        return [m for m in self.messages if not m.deleted]

    def stat(self) -> tuple[int, int]:
        visible = self.visible()
        return len(visible), sum(m.size for m in visible)

    def delete(self, number: int) -> None:
        self.get(number).deleted = True

    def reset(self) -> None:
        for message in self.messages:
            message.deleted = False

    @property
    def marked(self) -> list[Message]:
        return [m for m in self.messages if m.deleted]

    # ------------------------------------------------------------------ RETR and TOP

    async def send(self, number: int, sink: Sink, *, top_lines: int | None = None) -> None:
        """Stream message ``number`` as a complete POP3 answer (``+OK``, body, ``.``) to ``sink``.

        Raises :class:`MessageUnavailable` before anything was written when the message
        is unknown, marked deleted or gone upstream. An upstream failure after the ``+OK``
        went out propagates (the client then sees the connection end without ".").
        """
        message = self.get(number)
        answer = _Answer(sink, pop3.ok(f"{message.size} octets" if top_lines is None else ""))
        encoder = pop3.MessageEncoder(top_lines)
        section = await self._section(message)
        try:
            await self._fetch(message, answer, encoder, section, top=top_lines is not None)
        except MessageUnavailable:
            if section == BODY or answer.started:
                raise
            log.info("uid %d: BINARY fetch refused; fetching BODY instead", message.uid)
            self._verbatim[message.uid] = False
            await self._fetch(message, answer, encoder, BODY, top=top_lines is not None)
        await answer.write(encoder.finish())
        if top_lines is None:
            await self._after_retr(message, encoder.octets)

    async def _section(self, message: Message) -> bytes:
        """``BINARY.PEEK[]`` where that is the stored message, else ``BODY.PEEK[]``."""
        if "BINARY" not in self._upstream.capabilities:
            return BODY
        if message.uid not in self._verbatim:
            await self._learn_structures(message)
        return BINARY if self._verbatim.get(message.uid) else BODY

    async def _learn_structures(self, first: Message) -> None:
        """BODYSTRUCTURE of ``first`` and the next not yet known messages, in one UID FETCH."""
        uids = [m.uid for m in self.messages[first.number - 1 :]
                if not m.deleted and m.uid not in self._verbatim][:STRUCTURE_BATCH]
        try:
            fetched = await self._upstream.fetch_attrs(uids, b"BODYSTRUCTURE")
        except CommandFailed as exc:  # the connection is fine: fall back to BODY[]
            log.info("BODYSTRUCTURE refused (%s); fetching BODY", exc)
            fetched = {}
        for uid in uids:
            structure = fetched.get(uid, {}).get(b"BODYSTRUCTURE")
            self._verbatim[uid] = structure is not None and binary_is_verbatim(structure)

    async def _fetch(
        self, message: Message, answer: _Answer, encoder: pop3.MessageEncoder, section: bytes,
        *, top: bool,
    ) -> None:
        if not top or message.size <= TOP_FIRST_WINDOW:
            await self._stream(message, answer, encoder, section, partial=None)
        else:
            await self._stream_windows(message, answer, encoder, section)

    async def _stream(
        self, message: Message, answer: _Answer, encoder: pop3.MessageEncoder, section: bytes,
        partial: tuple[int, int] | None,
    ) -> int:
        """Feed one (partial) fetch of ``message`` to ``encoder``; returns the bytes read."""
        received = 0
        try:
            async with self._upstream.stream_body(message.uid, section, partial=partial) as chunks:
                async for chunk in chunks:
                    received += len(chunk)
                    await answer.write(encoder.feed(chunk))
        except MessageVanished:
            if answer.started:  # a window past the end of a message the server mis-sized
                return 0
            raise MessageUnavailable("Message is no longer available") from None
        return received

    async def _stream_windows(
        self, message: Message, answer: _Answer, encoder: pop3.MessageEncoder, section: bytes
    ) -> None:
        """TOP of a big message: fetch growing windows until TOP has what it needs."""
        offset, window = 0, TOP_FIRST_WINDOW
        while not encoder.done:
            received = await self._stream(message, answer, encoder, section,
                                          partial=(offset, window))
            offset += received
            if received < window:
                break  # the end of the message (RFC822.SIZE is not trusted for this)
            window = min(window * 2, TOP_MAX_WINDOW)

    async def _after_retr(self, message: Message, octets: int) -> None:
        self._retrieved.add(message.uid)
        if octets != message.size:
            log.info(
                "uid %d: RFC822.SIZE %d but %d POP3 octets; remembering the exact size",
                message.uid, self._server_sizes.get(message.uid, -1), octets,
            )
            message.size = octets
        server_size = self._server_sizes.get(message.uid, octets)
        self._sizes.put(self.uidvalidity, message.uid, octets, server_size=server_size)
        await self._sizes.save()

    # ------------------------------------------------------------------ UPDATE

    async def flush_seen(self) -> None:
        """Mark every completely retrieved message \\Seen upstream (one UID STORE)."""
        if self._retrieved:
            uids, self._retrieved = sorted(self._retrieved), set()
            await self._upstream.uid_store(uids, SEEN)

    async def commit(self) -> str:
        """Apply the deletions (QUIT in TRANSACTION). Returns the text for ``+OK``.

        Raises :class:`CommitRefused` when the upstream cannot delete safely (nothing is
        deleted then) and :class:`~gateway.errors.UpstreamError` when it fails.
        """
        try:
            return await self._commit()
        except UnsafeExpunge as exc:  # the client refused before changing anything
            raise CommitRefused(str(exc)) from None

    async def _commit(self) -> str:
        await self.flush_seen()
        uids = [m.uid for m in self.marked]
        if not uids:
            return "Logging out"
        if self.delete_mode == "keep":
            await self._upstream.uid_store(uids, SEEN)
            return f"Logging out, {len(uids)} messages kept and marked seen"
        if self.delete_mode == "trash":
            trash = await self._upstream.find_special_use(TRASH)
            if trash is None:
                raise CommitRefused("No \\Trash mailbox upstream; no messages deleted")
            if trash != self.mailbox:
                await self._move(uids, trash)
                await self._forget(uids)
                return f"Logging out, {len(uids)} messages moved to {trash}"
        await self._expunge(uids)
        await self._forget(uids)
        return f"Logging out, {len(uids)} messages deleted"

    async def _forget(self, uids: list[int]) -> None:
        """The upstream confirmed these UIDs gone: the remembered listing drops them, so the
        next session finds it current (rule 3 of :mod:`gateway.frontends.pop3_listing`)."""
        if self._listings is None or self._listing is None:
            return
        gone = set(uids)
        kept = tuple(m for m in self._listing.messages if m[0] not in gone)
        self._listing = replace(self._listing, messages=kept)
        try:
            await trio.to_thread.run_sync(self._listings.save, self._account, self._listing)
        except OSError as exc:
            log.warning("cannot save the POP3 listing of %s: %s", self._account, exc)

    async def _expunge(self, uids: list[int]) -> None:
        caps = self._upstream.capabilities
        if "UIDPLUS" in caps:
            await self._upstream.uid_store(uids, DELETED)
            await self._upstream.uid_expunge(uids)
            return
        # Without UIDPLUS an EXPUNGE would also remove messages other clients marked
        # \\Deleted: never do that. MOVE to \\Trash is the only safe way left.
        trash = await self._upstream.find_special_use(TRASH) if "MOVE" in caps else None
        if trash is None or trash == self.mailbox:
            raise CommitRefused(
                "The upstream server lacks UIDPLUS (and MOVE to \\Trash): "
                "refusing to expunge, no messages deleted"
            )
        await self._upstream.uid_move(uids, trash)

    async def _move(self, uids: list[int], mailbox: str) -> None:
        caps = self._upstream.capabilities
        if "MOVE" not in caps and "UIDPLUS" not in caps:
            # The client's COPY fallback would end in a plain EXPUNGE: refuse instead.
            raise CommitRefused("The upstream server has neither MOVE nor UIDPLUS: no messages moved")
        await self._upstream.uid_move(uids, mailbox)


class _Answer:
    """Holds the ``+OK`` line back until the first body byte (or the end) is known.

    That way a message that vanished upstream can still be answered with ``-ERR``.
    """

    def __init__(self, sink: Sink, status_line: bytes) -> None:
        self._sink = sink
        self._status_line = status_line
        self.started = False

    async def write(self, data: bytes) -> None:
        if not self.started:
            self.started = True
            data = self._status_line + data
        if data:
            await self._sink(data)
