"""The POP3-shaped mailbox operations of the upstream client: select, sizes, bodies, flags, deletion.

Theory of operation
-------------------
:class:`UpstreamIMAP` is the command engine (:class:`~gateway.upstream.engine.IMAPConnection`)
plus the few mailbox operations mailgate needs, each one or a few commands whose answers are
read by the one response reader (:meth:`Response.fetch`, :meth:`Response.values` of
:mod:`gateway.protocol.imap_responses`):

* :meth:`~UpstreamIMAP.select` (``EXAMINE`` with ``readonly``) → :class:`MailboxInfo`;
* :meth:`~UpstreamIMAP.fetch_all` (``UID FETCH 1:* (items)``, in mailbox order, one command
  however large the mailbox), :meth:`~UpstreamIMAP.fetch_sizes` and
  :meth:`~UpstreamIMAP.fetch_attrs` (``UID FETCH <uids>``);
* :meth:`~UpstreamIMAP.stream_body` → :class:`~gateway.upstream.body.BodyStream`;
* :meth:`~UpstreamIMAP.uid_store`, :meth:`~UpstreamIMAP.uid_expunge`,
  :meth:`~UpstreamIMAP.uid_move`, :meth:`~UpstreamIMAP.find_special_use`.

UID sets are written compactly (``1:3,7``) and split so that no command line is longer than
:data:`MAX_UID_SET_CHARS`.

**Deleting is exact or refused.** ``UID EXPUNGE`` (UIDPLUS, RFC 4315) removes exactly the UIDs
given. A plain ``EXPUNGE`` would also remove every message *another* client marked
``\\Deleted``, so :meth:`~UpstreamIMAP.uid_expunge` without UIDPLUS raises
:class:`UnsafeExpunge` and sends nothing, and :meth:`~UpstreamIMAP.uid_move` without MOVE
needs UIDPLUS before it copies anything (its fallback is COPY + STORE + UID EXPUNGE). The
caller does not have to check capabilities for mail to be safe.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import MailgateError
from ..protocol.imap_grammar import Value, ValueParser, decode_mailbox, encode_mailbox, quote
from ..protocol.imap_responses import FetchItems, Response
from .body import BodyStream
from .engine import IMAPConnection, UpstreamResponse
from .transport import DetachedStream

__all__ = [
    "MAX_UID_SET_CHARS",
    "MailboxInfo",
    "UnsafeExpunge",
    "UpstreamIMAP",
    "fetch_results",
    "quote_mailbox",
    "uid_set",
]

#: The name recorded for a mailbox a relayed IMAP client selected (its name is not tracked).
RELAYED_MAILBOX = "(selected by the IMAP client)"
#: Longest UID set written into one command (servers limit command lines; Dovecot 64 KiB).
MAX_UID_SET_CHARS = 8000


class UnsafeExpunge(MailgateError):
    """Deleting exactly the given messages needs UIDPLUS, which the server lacks: nothing was
    changed (a plain EXPUNGE would also remove messages other clients marked \\Deleted)."""


@dataclass(frozen=True, slots=True)
class MailboxInfo:
    """What SELECT told about a mailbox."""

    name: str
    exists: int
    uidvalidity: int | None
    uidnext: int | None
    flags: tuple[str, ...] = ()
    permanent_flags: tuple[str, ...] = ()
    read_only: bool = False


def quote_mailbox(name: str) -> bytes:
    """A mailbox name as an IMAP quoted string (modified UTF-7 for non-ASCII, RFC 3501 §5.1.3)."""
    encoded = encode_mailbox(name)
    if any(c in encoded for c in b"\r\n\x00"):
        raise ValueError("mailbox name contains CR, LF or NUL")
    return quote(encoded)


def uid_set(uids: Iterable[int]) -> bytes:
    """A compact UID set: ``[1, 2, 3, 7]`` → ``b"1:3,7"``."""
    ordered = sorted(set(uids))
    if not ordered or ordered[0] < 1:
        raise ValueError("a UID set needs at least one UID, all positive")
    ranges: list[bytes] = []
    start = prev = ordered[0]
    for uid in ordered[1:] + [0]:
        if uid == prev + 1:
            prev = uid
            continue
        ranges.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
        start = prev = uid
    return b",".join(ranges)


def _uid_batches(uids: Iterable[int]) -> list[bytes]:
    """UID sets each short enough for one command line."""
    batches: list[bytes] = []
    for part in uid_set(uids).split(b","):
        if batches and len(batches[-1]) + 1 + len(part) <= MAX_UID_SET_CHARS:
            batches[-1] += b"," + part
        else:
            batches.append(part)
    return batches


def fetch_results(response: UpstreamResponse) -> list[FetchItems]:
    """The FETCH responses of a command's answer, in mailbox (sequence number) order.

    ``ValueError`` if one cannot be parsed."""
    by_number: dict[int, FetchItems] = {}
    for r in response.data(b"FETCH"):
        assert r.number is not None  # the reader gives FETCH responses their number
        by_number.setdefault(r.number, {}).update(r.fetch())
    return [by_number[n] for n in sorted(by_number)]


def _flags(value: Value) -> tuple[str, ...]:
    if not isinstance(value, tuple):
        return ()
    return tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value)


def _first_value(r: Response) -> Value:
    """The first data item of an untagged response; ``()`` if it cannot be parsed."""
    try:
        values = r.values()
    except ValueError:
        return ()
    return values[0] if values else ()


def _code_value(value: bytes) -> Value:
    """The first data item of a response code's argument (``(\\Seen \\*)``); ``()`` if none."""
    try:
        values = ValueParser([value], [], response=True).parse()
    except ValueError:
        return ()
    return values[0] if values else ()


class UpstreamIMAP(IMAPConnection):
    """One upstream IMAP connection. Create with :func:`gateway.upstream.client.connect`, then
    authenticate (:mod:`gateway.upstream.login`)."""

    selected: MailboxInfo | None = None

    def reclaim(self, stream: DetachedStream, buffered: bytes, *, selected: bool) -> None:
        """Take the connection back from the IMAP relay (see :meth:`reattach`); ``selected``:
        the relayed session left a mailbox selected (the pool leaves it with UNSELECT)."""
        self.reattach(stream, buffered)
        self.selected = MailboxInfo(RELAYED_MAILBOX, 0, None, None) if selected else None

    async def select(self, mailbox: str, *, readonly: bool = False) -> MailboxInfo:
        """SELECT (or EXAMINE) ``mailbox``; raises ``UpstreamNo`` if it does not exist."""
        verb = b"EXAMINE " if readonly else b"SELECT "
        response = (await self.command(verb + quote_mailbox(mailbox))).check()
        exists = 0
        uidvalidity = uidnext = None
        flags: tuple[str, ...] = ()
        permanent: tuple[str, ...] = ()
        for r in response.untagged:
            if r.keyword == b"EXISTS" and r.number is not None:
                exists = r.number
            elif r.keyword == b"FLAGS":
                flags = _flags(_first_value(r))
            elif r.keyword == b"OK" and r.code:
                name, _, value = r.code.partition(b" ")
                name = name.upper()
                if name == b"UIDVALIDITY" and value.isdigit():
                    uidvalidity = int(value)
                elif name == b"UIDNEXT" and value.isdigit():
                    uidnext = int(value)
                elif name == b"PERMANENTFLAGS":
                    permanent = _flags(_code_value(value))
        code = (response.code or "").upper()
        info = MailboxInfo(mailbox, exists, uidvalidity, uidnext, flags, permanent,
                           read_only=readonly or code.startswith("READ-ONLY"))
        self.selected = info
        return info

    async def fetch_all(self, items: Sequence[bytes]) -> list[FetchItems]:
        """``UID FETCH 1:* (items)`` of the selected mailbox: each message's items, in mailbox
        order (``[{b"UID": 4, b"RFC822.SIZE": 99}, …]``)."""
        if self.selected is not None and self.selected.exists == 0:
            return []
        response = (await self.command(b"UID FETCH 1:* (" + b" ".join(items) + b")")).check()
        return self._parsed(response)

    def _parsed(self, response: UpstreamResponse) -> list[FetchItems]:
        try:
            return fetch_results(response)
        except ValueError as exc:
            raise self.fail(f"{self.where} sent a FETCH answer that cannot be parsed: {exc}") from None

    async def fetch_sizes(self) -> list[tuple[int, int]]:
        """``[(uid, rfc822_size)]`` of every message of the selected mailbox, in mailbox order."""
        out = []
        for attrs in await self.fetch_all((b"UID", b"RFC822.SIZE")):
            uid, size = attrs.get(b"UID"), attrs.get(b"RFC822.SIZE")
            if isinstance(uid, int) and isinstance(size, int):
                out.append((uid, size))
        return out

    async def uid_search_all(self) -> set[int]:
        """The UIDs of every message of the selected mailbox (``UID SEARCH ALL``)."""
        response = (await self.command(b"UID SEARCH ALL")).check()
        uids: set[int] = set()
        for r in response.data(b"SEARCH"):
            words = r.raw.split()[2:]
            if not all(w.isdigit() for w in words):
                raise self.fail(f"{self.where} sent a SEARCH answer that cannot be parsed")
            uids.update(map(int, words))
        return uids

    async def fetch_attrs(self, uids: Iterable[int], attrs: bytes) -> dict[int, FetchItems]:
        """``UID FETCH`` of ``attrs`` (e.g. ``b"X-GM-MSGID"``): ``{uid: {b"X-GM-MSGID": …}}``."""
        wanted = set(uids)
        if not wanted:
            return {}
        out: dict[int, FetchItems] = {}
        for batch in _uid_batches(wanted):
            response = (await self.command(b"UID FETCH " + batch + b" (UID " + attrs + b")")).check()
            for data in self._parsed(response):
                uid = data.get(b"UID")
                if isinstance(uid, int) and uid in wanted:
                    out.setdefault(uid, {}).update(data)
        return out

    def stream_body(
        self, uid: int, section: bytes = b"BODY.PEEK[]", partial: tuple[int, int] | None = None
    ) -> BodyStream:
        """``async with client.stream_body(uid) as body: async for chunk in body: ...``

        Chunks arrive as the server sends them; ``body.size`` is the literal's size once the
        first chunk is known. Raises ``MessageVanished`` if the server has no such message.
        """
        item = section + (b"<%d.%d>" % partial if partial else b"")
        return BodyStream(self, uid, b"UID FETCH %d (UID %s)" % (uid, item))

    async def uid_store(self, uids: Iterable[int], flags_op: bytes) -> UpstreamResponse:
        """``UID STORE <uids> <flags_op>``, e.g. ``flags_op=b"+FLAGS.SILENT (\\\\Deleted)"``."""
        last = None
        for batch in _uid_batches(uids):
            last = (await self.command(b"UID STORE " + batch + b" " + flags_op)).check()
        assert last is not None
        return last

    def _require_uidplus(self, what: str) -> None:
        if "UIDPLUS" not in self.capabilities:
            raise UnsafeExpunge(
                f"{self.where} lacks UIDPLUS: {what} would need a plain EXPUNGE, which also removes "
                "messages other clients marked \\Deleted; nothing was changed"
            )

    async def uid_expunge(self, uids: Iterable[int]) -> UpstreamResponse:
        """Expunge exactly ``uids`` (``UID EXPUNGE``, UIDPLUS). Without UIDPLUS this raises
        :class:`UnsafeExpunge` before sending anything."""
        self._require_uidplus("expunging")
        uids = list(uids)
        last = None
        for batch in _uid_batches(uids):
            last = (await self.command(b"UID EXPUNGE " + batch)).check()
        assert last is not None
        return last

    async def uid_move(self, uids: Iterable[int], mailbox: str) -> None:
        """Move ``uids`` to ``mailbox``: ``UID MOVE`` (RFC 6851) or COPY + STORE + UID EXPUNGE
        (which needs UIDPLUS: without it :class:`UnsafeExpunge` is raised before the COPY)."""
        uids = list(uids)
        target = quote_mailbox(mailbox)
        if "MOVE" in self.capabilities:
            for batch in _uid_batches(uids):
                (await self.command(b"UID MOVE " + batch + b" " + target)).check()
            return
        self._require_uidplus("moving without MOVE")
        for batch in _uid_batches(uids):
            (await self.command(b"UID COPY " + batch + b" " + target)).check()
        await self.uid_store(uids, b"+FLAGS.SILENT (\\Deleted)")
        await self.uid_expunge(uids)

    async def find_special_use(self, attr: str) -> str | None:
        """The name of the mailbox with special-use ``attr`` (e.g. ``"\\\\Trash"``), if any."""
        if "SPECIAL-USE" in self.capabilities:
            response = await self.command(b'LIST (SPECIAL-USE) "" "*"')
            if not response.ok:  # some servers announce SPECIAL-USE without LIST-EXTENDED
                response = await self.command(b'LIST "" "*"')
        elif "XLIST" in self.capabilities:
            response = await self.command(b'XLIST "" "*"')
        else:
            response = await self.command(b'LIST "" "*"')
        response.check()
        wanted = attr.lower()
        for r in response.untagged:
            if r.keyword not in (b"LIST", b"XLIST"):
                continue
            try:
                parsed = r.values()
            except ValueError:
                continue
            if len(parsed) < 3 or not isinstance(parsed[0], tuple):
                continue
            if any(isinstance(f, bytes) and f.decode("ascii", "replace").lower() == wanted for f in parsed[0]):
                name = parsed[2]
                if isinstance(name, bytes):
                    return decode_mailbox(name)
                if isinstance(name, int):  # an all-digit atom
                    return str(name)
        return None
