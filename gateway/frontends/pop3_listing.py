"""The POP3 listing remembered across sessions: a later session asks the upstream only what changed.

Theory of operation
-------------------
Rules first:

1. **What is remembered.** Per account: the ``pop3_mailbox`` name, its UIDVALIDITY and UIDNEXT,
   and for every message in mailbox order its UID, RFC822.SIZE and (Gmail) X-GM-MSGID -- a
   :class:`Listing`. UIDLs are derived from these (``default_uidl``/``gmail_uidl`` of
   :mod:`gateway.frontends.pop3_mapping`), so the same message always gets the same UIDL and no
   UIDL is ever given to another message: within one UIDVALIDITY an IMAP server never reuses a
   UID, and a message's size and X-GM-MSGID never change.
2. **A listing is only used with the UIDVALIDITY it was taken under** and for the same mailbox;
   anything else discards it and the full listing is fetched (``UID FETCH 1:*``).
3. **Nothing changed** (no round trip): the SELECT's ``EXISTS`` equals the remembered count and
   its ``UIDNEXT`` the remembered UIDNEXT. UIDs only grow, so no UID was added (UIDNEXT is the
   same) and, with the count equal, none was removed: the set of messages is the remembered one.
4. **Something changed** (one or two round trips): ``UID SEARCH ALL`` gives the UIDs now in the
   mailbox; remembered UIDs missing from it are dropped (never shown again: an expunge by
   another client), and only the new UIDs are fetched (``UID FETCH <new> (UID RFC822.SIZE
   [X-GM-MSGID])``). A message expunged and appended again has a new UID, hence a new UIDL.
   This needs neither CONDSTORE nor QRESYNC, so it works the same on Microsoft 365 and Gmail
   and enables nothing on the connection (which the pool of upstream connections may then hand
   to an IMAP client, see :mod:`gateway.upstream.pool`).
5. **Storage** goes through the two-method :class:`gateway.ports.Pop3ListingStore`
   interface, implemented by :class:`Listings` on a :class:`gateway.ports.Pop3StateStore`
   (the listing as JSON text of kind ``"listing"``): :class:`Pop3StateFiles` keeps one file
   per account beside the POP3 size cache (``state_dir/pop3/<account>.listing.json``,
   written to a ``.tmp`` file and renamed), the PostgreSQL store one row per account, so
   every instance serving the account sees the same listing. A damaged, unreadable or
   unknown listing is ignored and rebuilt. The POP3 maildrop lock guarantees one writer per
   account.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..protocol.imap_responses import FetchItems
from ..upstream.client import UpstreamIMAP, uid_set
from ..upstream.mailbox import MailboxInfo

if TYPE_CHECKING:
    from ..ports import Pop3StateStore

log = logging.getLogger("mailgate.pop3")

__all__ = ["FORMAT", "LISTING", "Listing", "ListingFiles", "Listings", "Pop3StateFiles", "Snapshot",
           "refresh_listing"]

#: The kind of :class:`gateway.ports.Pop3StateStore` text holding the listing.
LISTING = "listing"

#: Version of the file format (a file of another version is ignored and rebuilt).
FORMAT = 1

#: ``(uid, RFC822.SIZE, X-GM-MSGID or None)`` per message, in mailbox order.
Snapshot = list[tuple[int, int, int | None]]


@dataclass(frozen=True, slots=True)
class Listing:
    """One account's remembered POP3 listing (rule 1)."""

    mailbox: str
    uidvalidity: int
    uidnext: int | None
    messages: tuple[tuple[int, int, int | None], ...]

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "mailbox": self.mailbox, "uidvalidity": self.uidvalidity,
            "uidnext": self.uidnext, "uids": [m[0] for m in self.messages],
            "sizes": [m[1] for m in self.messages],
            "msgids": [m[2] for m in self.messages] if any(m[2] is not None for m in self.messages)
            else None,
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Listing | None:
        """The listing in ``text``; ``None`` if it is not a valid one."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                return None
            uids, sizes, msgids = data["uids"], data["sizes"], data["msgids"]
            if msgids is None:
                msgids = [None] * len(uids)
            if not (len(uids) == len(sizes) == len(msgids)):
                return None
            messages = tuple(zip(uids, sizes, msgids))
            if not all(isinstance(u, int) and isinstance(s, int) and (g is None or isinstance(g, int))
                       for u, s, g in messages):
                return None
            if any(a[0] >= b[0] for a, b in zip(messages, messages[1:])):
                return None  # mailbox order is UID order
            uidnext = data["uidnext"]
            mailbox, uidvalidity = data["mailbox"], data["uidvalidity"]
            if not (isinstance(mailbox, str) and isinstance(uidvalidity, int)
                    and (uidnext is None or isinstance(uidnext, int))):
                return None
            return cls(mailbox, uidvalidity, uidnext, messages)
        except (ValueError, KeyError, TypeError):
            return None


class Pop3StateFiles:
    """:class:`gateway.ports.Pop3StateStore` on files: ``<dir>/<account>.<kind>.json``."""

    def __init__(self, directory: Path):
        self.directory = directory

    def path(self, account: str, kind: str) -> Path:
        return self.directory / f"{urllib.parse.quote(account, safe='')}.{kind}.json"

    def pop3_state(self, account: str, kind: str) -> str | None:
        try:
            return self.path(account, kind).read_text()
        except FileNotFoundError:
            return None

    def save_pop3_state(self, account: str, kind: str, text: str) -> None:
        path = self.path(account, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


class Listings:
    """:class:`gateway.ports.Pop3ListingStore` on a :class:`gateway.ports.Pop3StateStore`."""

    def __init__(self, state: Pop3StateStore):
        self.state = state

    def load(self, account: str) -> Listing | None:
        try:
            text = self.state.pop3_state(account, LISTING)
        except OSError as exc:
            log.warning("ignoring unreadable POP3 listing of %s: %s", account, exc)
            return None
        if text is None:
            return None
        listing = Listing.from_json(text)
        if listing is None:
            log.warning("ignoring damaged POP3 listing of %s (it is rebuilt)", account)
        return listing

    def save(self, account: str, listing: Listing) -> None:
        self.state.save_pop3_state(account, LISTING, listing.to_json())


class ListingFiles(Listings):
    """:class:`Listings` on files: ``<dir>/<account>.listing.json``."""

    def __init__(self, directory: Path):
        super().__init__(Pop3StateFiles(directory))


async def refresh_listing(
    upstream: UpstreamIMAP, info: MailboxInfo, remembered: Listing | None, *, gmail: bool
) -> tuple[Listing, bool]:
    """The listing of the mailbox just selected (``info``), from ``remembered`` and what the
    upstream says changed (rules 2-4). Returns it and whether it differs from ``remembered``."""
    uidvalidity = int(info.uidvalidity or 0)
    usable = (remembered is not None and remembered.mailbox == info.name
              and remembered.uidvalidity == uidvalidity and info.uidvalidity is not None)
    if usable and remembered is not None:
        if (info.uidnext is not None and remembered.uidnext == info.uidnext
                and info.exists == len(remembered.messages)):
            return remembered, False
        messages = await _changed(upstream, remembered, gmail=gmail)
    else:
        messages = await _full(upstream, gmail=gmail) if info.exists else []
    listing = Listing(info.name, uidvalidity, info.uidnext, tuple(messages))
    return listing, listing != remembered


def _items(gmail: bool) -> tuple[bytes, ...]:
    return (b"UID", b"RFC822.SIZE", b"X-GM-MSGID") if gmail else (b"UID", b"RFC822.SIZE")


def _entries(fetched: list[FetchItems]) -> Snapshot:
    out: Snapshot = []
    for data in fetched:
        uid, size, msgid = data.get(b"UID"), data.get(b"RFC822.SIZE"), data.get(b"X-GM-MSGID")
        if isinstance(uid, int) and isinstance(size, int):
            out.append((uid, size, msgid if isinstance(msgid, int) else None))
    return out


async def _full(upstream: UpstreamIMAP, *, gmail: bool) -> Snapshot:
    """Every message's UID, size (and X-GM-MSGID), in one ``UID FETCH 1:*``; a message whose
    answer lacks UID or RFC822.SIZE is left out."""
    return _entries(await upstream.fetch_all(_items(gmail)))


async def _changed(upstream: UpstreamIMAP, remembered: Listing, *, gmail: bool) -> Snapshot:
    now = await upstream.uid_search_all()
    kept = [m for m in remembered.messages if m[0] in now]
    known = {m[0] for m in kept}
    new = sorted(now - known)
    added: Snapshot = []
    if new:
        fetched = await upstream.fetch_attrs(new, b" ".join(_items(gmail)[1:]))
        added = _entries([fetched[uid] for uid in new if uid in fetched])
    log.debug("POP3 listing: %d kept, %d gone, %d new (%s)", len(kept),
              len(remembered.messages) - len(kept), len(added),
              uid_set(new).decode() if new else "-")
    return sorted(kept + added)

