"""The IMAP relay after login: client ⇄ upstream, two tasks, byte streams kept intact.

Theory of operation
-------------------
Two tasks run in one nursery; when either ends, the other is cancelled:

``client → upstream``
    Feeds the client's bytes to :class:`~gateway.protocol.imap_commands.CommandRelay`, which
    frames commands just enough to keep state and streams literal octets through in chunks.
    Commands mailgate must not pass on (``STARTTLS``, ``COMPRESS``, ``LOGIN``,
    ``AUTHENTICATE``) come out as a :class:`~gateway.protocol.imap_commands.Reply` when their
    ``BAD`` is due, which this task writes. A client's ``{n+}`` bigger than the upstream's
    LITERAL- limit is sent as ``{n}``: this task then waits for the upstream's ``+`` before
    sending the literal (``upstream_command_timeout``). Bytes go out in writes of up to
    :data:`WRITE_BATCH`. The client's silence is bounded by ``limits.imap_idle_timeout``
    (≥ 30 minutes, RFC 3501 §5.4).

``upstream → client``
    Feeds the upstream's bytes to :class:`~gateway.protocol.imap_passthrough.ResponseScanner`,
    which passes them through untouched (slices, no copy of literal data) except for capability
    lists, and reports ``+``, tagged responses and ``* BYE``, which this task passes to the
    session's :class:`~gateway.protocol.imap_relay_state.RelayState` and does as it answers: a
    ``+`` answering mailgate's own rewritten literal is swallowed, and a tagged response may
    release mailgate's own answers to later commands, written right after it (responses keep
    command order). Output is batched: written when :data:`WRITE_BATCH` bytes are
    waiting or when the upstream's data ends at a response boundary, so a 50 MB FETCH moves in
    64 KiB writes and costs one batch of memory, while an IDLE ``* 3 EXISTS`` goes out at once.

All the state is the ``RelayState``'s (rule 1 of its module); this module only executes.

Both tasks write to the client, so writes are serialised by a lock that the upstream task holds
from the first byte of a response it has received (written or still batched) to its end:
mailgate's own answers (``BAD`` for a refused command, a farewell ``* BYE``) only ever land
between two responses, never inside a literal, and never before a response already received.

A stalled upstream: while a command sent upstream awaits its tagged answer (IDLE excepted) or
a response is half received, the upstream must send something within
``limits.upstream_command_timeout``; otherwise the session ends as ``upstream_timeout`` (the
client gets ``* BYE`` between responses, or sees the connection end inside one).

The timeouts are kept by a third task, the watchdog: the data path only notes when a read or
write began (a clock per wait), and the watchdog sleeps until the earliest deadline, wakes,
and ends the session or sleeps again. A cancel scope per read and per write (three per small
round trip) was ~8% of a round trip's CPU (docs/performance.md, "The relay hot path").

Endings: the client leaves or times out → the upstream session is logged out (bounded by
``limits.logout_timeout``) and closed. The upstream closes (after the client's LOGOUT, or on its
own, or breaks) → the client gets ``* BYE`` unless the upstream sent one, or unless the break
came in the middle of a response, where any byte mailgate added would be taken for message data
(the client then sees the connection close mid-response, which every client treats as an
error); the client connection is then closed by the server.

Handing back (when the session was given ``give_back``): a client's ``LOGOUT`` that the
``RelayState`` finds clean (:attr:`~gateway.protocol.imap_relay_state.RelayState.hand_back_ok`;
with a mailbox selected only if the upstream has UNSELECT) is not sent upstream: the relay
stops, the upstream connection is taken back (:meth:`UpstreamIMAP.reclaim`) and handed to
``give_back`` (the pool: UNSELECT, then idle until the next login), and only then does the
client get ``* BYE`` and its tagged ``OK``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from ..net import ClientStream
from ..protocol.imap_commands import (
    LITERAL_MINUS_MAX,
    NEED_DATA,
    AwaitContinuation,
    CommandLine,
    CommandRelay,
    Forward,
    ProtocolError,
    Reply,
    bye,
)
from ..protocol.imap_relay_state import RelayState
from ..protocol.imap_passthrough import Bye, Continuation, ResponseScanner, Tagged
from ..protocol.imap_passthrough import ProtocolError as UpstreamProtocolError

if TYPE_CHECKING:
    from ..config import Limits
    from ..upstream.client import UpstreamIMAP

log = logging.getLogger("mailgate.imap")

#: Upstream words that deserve a log line with advice for the operator (Microsoft 365's).
UPSTREAM_ADVICE = (
    (b"AccessTokenExpired", "the access token expired mid-session; the client reconnects and "
     "mailgate logs in with a refreshed token"),
    (b"Suggested Backoff Time", "the provider is throttling this mailbox; fewer clients polling "
     "at once or a lower limits.upstream_connections_per_account help"),
    (b"authenticated but not connected", "the token is valid but the mailbox is not reachable "
     "with it: check upstream_user and the mailbox permissions"),
)

#: Size of the writes to either side; TLS throughput needs ≥ 64 KiB writes.
WRITE_BATCH = 64 * 1024
#: Bytes asked of a stream per read (a TLS stream returns one 16 KiB record at most anyway).
RECEIVE_SIZE = 64 * 1024
#: Longest a farewell (`* BYE`) may wait for a client that does not read.
FAREWELL_TIMEOUT = 5.0

_UPSTREAM_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


def nonsync_literal_limit(capabilities: frozenset[str] | set[str]) -> int | None:
    """Largest ``{n+}`` the upstream takes: any (LITERAL+), 4096 (LITERAL-) or none (0)."""
    caps = {c.upper() for c in capabilities}
    if "LITERAL+" in caps:
        return None
    return LITERAL_MINUS_MAX if "LITERAL-" in caps else 0


class _End(Exception):
    """Stop the relay; ``outcome`` says why (for the session log)."""

    def __init__(self, outcome: str, farewell: str | None = None):
        super().__init__(outcome)
        self.outcome = outcome
        self.farewell = farewell


class ImapRelay:
    """One logged-in session: relays between ``client`` and the upstream IMAP session."""

    def __init__(
        self,
        client: ClientStream,
        upstream: UpstreamIMAP,
        *,
        limits: "Limits",
        client_buffered: bytes = b"",
        user: str = "-",
        give_back: Callable[[UpstreamIMAP], Awaitable[None]] | None = None,
    ):
        self.client = client
        self.upstream = upstream
        self.user = user
        self.limits = limits
        self._up_stream, up_buffered = upstream.detach()
        self._up_pending = up_buffered
        self.state = RelayState()
        self.framer = CommandRelay(
            max_line=limits.max_line,
            max_literal=limits.max_literal,
            nonsync_literal_limit=nonsync_literal_limit(upstream.capabilities),
            state=self.state,
        )
        self.framer.receive_data(client_buffered)
        self.scanner = ResponseScanner(max_line=limits.max_line)
        self._out_lock = trio.Lock()
        # Set on each "+" and tagged response while the client task waits for one (made only
        # then: most sessions never wait, and an idle session should hold no more than it must).
        self._upstream_said: trio.Event | None = None
        self._end: _End | None = None
        # The watchdog's clocks (None: not running): a client read, a client write, an
        # upstream read that must see data (a command or response is outstanding).
        self._client_wait_since: float | None = None
        self._client_send_since: float | None = None
        self._upstream_receiving = False
        self._stall_since: float | None = None
        self._watch: trio.CancelScope | None = None  # the watchdog's sleep
        self._watch_at = float("inf")  # ... and when it ends
        self._give_back = give_back
        self._logout_tag: bytes | None = None  # a LOGOUT answered here (handing back)
        self._handed_back = False  # the upstream connection belongs to the pool now

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> str:
        """Relay until one side ends; return the outcome (``logout``, ``client_gone`` …)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guard, self._client_to_upstream, nursery.cancel_scope)
                nursery.start_soon(self._guard, self._upstream_to_client, nursery.cancel_scope)
                nursery.start_soon(self._guard, self._watchdog, nursery.cancel_scope)
            end = self._end or _End("closed")
            if self._logout_tag is not None and end.outcome == "logout":
                await self._hand_back(self._logout_tag)
            await self._finish(end)
            return end.outcome
        finally:
            if not self._handed_back:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(self._up_stream)

    async def _hand_back(self, tag: bytes) -> None:
        assert self._give_back is not None
        with trio.CancelScope(shield=True):
            self.upstream.reclaim(self._up_stream, self._up_pending, selected=self.state.selected)
            self._handed_back = True
            await self._give_back(self.upstream)
        await self._send_farewell(bye("Logging out.") + tag + b" OK LOGOUT completed.\r\n")

    def _may_hand_back(self, event: CommandLine, out: bytearray) -> bool:
        return (
            self._give_back is not None and event.name == b"LOGOUT" and not out
            and self.state.hand_back_ok and self.scanner.at_boundary
            and (not self.state.selected or "UNSELECT" in self.upstream.capabilities)
        )

    async def _guard(self, task: Any, scope: trio.CancelScope) -> None:
        try:
            await task()
        except _End as end:
            if self._end is None:
                self._end = end
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self._end is None:
                self._end = _End("client_gone")
        scope.cancel()

    async def _finish(self, end: _End) -> None:
        if end.outcome in ("client_gone", "timeout", "protocol_error"):
            # The client left or must go: say goodbye if possible, log the upstream out politely.
            if end.farewell and self.scanner.at_boundary:
                await self._send_farewell(bye(end.farewell))
            await self._logout_upstream()
        elif not self.state.bye_seen and self.scanner.at_boundary and end.farewell:
            await self._send_farewell(bye(end.farewell))
        log.info("imap %s: %s session ended (%s; upstream: %s)", self.client.peer, self.user,
                 end.outcome, self.state.describe())

    async def _logout_upstream(self) -> None:
        """End the upstream session politely, unless a command is half sent (then just close)."""
        farewell = self.state.upstream_farewell()
        if farewell is None:
            return
        with trio.move_on_after(self.limits.logout_timeout) as scope:
            scope.shield = True
            try:
                await self._up_stream.send_all(farewell)
                while await self._up_stream.receive_some(RECEIVE_SIZE):
                    pass
            except (*_UPSTREAM_GONE, OSError):
                pass

    async def _send_farewell(self, data: bytes) -> None:
        with trio.move_on_after(FAREWELL_TIMEOUT) as scope:
            scope.shield = True
            try:
                await self.client.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _answer_client(self, data: bytes) -> None:
        """Send mailgate's own response between two upstream responses.

        Waiting for the lock is bounded by the upstream finishing its current response (which
        may be a long FETCH); the write itself by :meth:`_send_client`.
        """
        async with self._out_lock:
            await self._send_client(data)

    async def _send_client(self, data: bytes | bytearray) -> None:
        """Write to the client; one that reads nothing for ``imap_idle_timeout`` is dropped
        (by the :meth:`_watchdog`)."""
        self._client_send_since = since = trio.current_time()
        self._wake_watchdog(since + self.limits.imap_idle_timeout)
        try:
            await self.client.send_all(data)
        finally:
            self._client_send_since = None

    # ------------------------------------------------------------------ timeouts

    async def _watchdog(self) -> None:
        """Enforce the relay's timeouts from the clocks the data path sets (instead of a cancel
        scope per read and per write, see the module docstring): a client
        read waiting ``imap_idle_timeout`` → ``timeout``; a client write blocked as long →
        ``client_stuck``; an upstream read waiting ``upstream_command_timeout`` while a command
        or a response is outstanding → ``upstream_timeout``. It sleeps until the earliest
        deadline; a clock armed earlier than that wakes it (:meth:`_wake_watchdog`)."""
        limits = self.limits
        while True:
            now = trio.current_time()
            due = float("inf")
            if self._client_wait_since is not None:
                at = self._client_wait_since + limits.imap_idle_timeout
                if at <= now:
                    raise _End("timeout", "Autologout: idle for too long.")
                due = min(due, at)
            if self._client_send_since is not None:
                at = self._client_send_since + limits.imap_idle_timeout
                if at <= now:
                    raise _End("client_stuck")
                due = min(due, at)
            if self._stall_since is not None:
                at = self._stall_since + limits.upstream_command_timeout
                if at <= now:
                    log.warning("imap %s: %s: upstream sent nothing for %gs (limits.upstream_"
                                "command_timeout) while a command was outstanding",
                                self.client.peer, self.user, limits.upstream_command_timeout)
                    raise _End("upstream_timeout", "Upstream server did not answer in time.")
                due = min(due, at)
            self._watch_at = due
            with trio.CancelScope(deadline=due) as self._watch:
                await trio.sleep_forever()
            self._watch = None

    def _wake_watchdog(self, at: float) -> None:
        """A clock now runs out at ``at``: make the watchdog look by then."""
        if at < self._watch_at:
            self._watch_at = at
            if self._watch is not None:
                self._watch.deadline = at

    # ------------------------------------------------------------------ client → upstream

    async def _client_to_upstream(self) -> None:
        out = bytearray()
        while True:
            await self._drain_framer(out)
            if out:
                await self._send_upstream(out)
                out = bytearray()
            self._client_wait_since = since = trio.current_time()
            self._wake_watchdog(since + self.limits.imap_idle_timeout)
            data = await self.client.receive_some(RECEIVE_SIZE)
            self._client_wait_since = None
            if not data:
                # A client that sent LOGOUT may close as soon as it has read the tagged OK,
                # before the upstream closes: that is still a logout, not a vanished client.
                raise _End("logout" if self.state.logout_sent else "client_gone")
            self.framer.receive_data(data)

    async def _drain_framer(self, out: bytearray) -> None:
        while True:
            try:
                event = self.framer.next_event()
            except ProtocolError as exc:
                raise _End("protocol_error", f"{str(exc).capitalize()}.") from None
            if event is NEED_DATA:
                return
            if isinstance(event, CommandLine):
                self.state.arguments(event.arguments)
                if self._may_hand_back(event, out):
                    self._logout_tag = event.tag
                    raise _End("logout")
            if isinstance(event, (CommandLine, Forward)):
                out += event.data
                if isinstance(event, CommandLine):
                    self._arm_stall_deadline()
            elif isinstance(event, Reply):
                await self._answer_client(event.data)
            elif isinstance(event, AwaitContinuation):
                await self._send_upstream(out)
                out.clear()
                with trio.move_on_after(self.limits.upstream_command_timeout):
                    while self.state.awaiting_continuation:
                        self._upstream_said = said = trio.Event()
                        await said.wait()
                self._upstream_said = None
                if self.state.awaiting_continuation:
                    raise _End("upstream_timeout", "Upstream server did not answer in time.")
            if len(out) >= WRITE_BATCH:
                await self._send_upstream(out)
                out.clear()

    async def _send_upstream(self, data: bytearray) -> None:
        if not data:
            return
        try:
            await self._up_stream.send_all(bytes(data))
        except _UPSTREAM_GONE:
            raise _End("upstream_closed", "Upstream server closed the connection.") from None

    # ------------------------------------------------------------------ upstream → client

    async def _upstream_to_client(self) -> None:
        batch = bytearray()
        holding = False  # the output lock, held while a received response is not all written
        try:
            while True:
                data, self._up_pending = self._up_pending, b""
                if not data:
                    data = await self._receive_upstream()
                try:
                    items = self.scanner.feed(data)
                except UpstreamProtocolError as exc:
                    log.warning("imap %s: %s: %s", self.client.peer, self.user, exc)
                    raise _End("upstream_error") from None
                for item in items:
                    if isinstance(item, (bytes, memoryview)):
                        batch += item
                    else:
                        batch += self._on_event(item)
                if batch:
                    # Held from the first byte received: nothing of mailgate's may pass it.
                    if not holding:
                        try:
                            self._out_lock.acquire_nowait()  # no scheduler trip when free
                        except trio.WouldBlock:
                            await self._out_lock.acquire()
                        holding = True
                    if len(batch) >= WRITE_BATCH or self.scanner.at_boundary:
                        await self._send_client(batch)
                        batch = bytearray()
                if holding and self.scanner.at_boundary:
                    self._out_lock.release()
                    holding = False
        finally:
            if holding:
                self._out_lock.release()

    def _arm_stall_deadline(self) -> None:
        """While a command waits for its answer (or a response is half received), the upstream
        must send something within ``limits.upstream_command_timeout`` (from the start of the
        read, or from the command that made it owe one)."""
        if not self._upstream_receiving or self._stall_since is not None:
            return
        if self.state.upstream_owes or not self.scanner.at_boundary:
            self._stall_since = since = trio.current_time()
            self._wake_watchdog(since + self.limits.upstream_command_timeout)

    async def _receive_upstream(self) -> bytes:
        self._upstream_receiving = True
        self._arm_stall_deadline()
        try:
            received = await self._up_stream.receive_some(RECEIVE_SIZE)
            # The TLS streams return bytes (the type allows a bytearray): no copy.
            data = received if isinstance(received, bytes) else bytes(received)
        except (*_UPSTREAM_GONE, OSError):
            data = b""
        finally:
            self._upstream_receiving = False
            self._stall_since = None
        if not data:
            if self.state.bye_seen:
                raise _End("logout" if self.state.logout_sent else "upstream_closed")
            raise _End("upstream_closed", "Upstream server closed the connection.")
        return data

    def _on_event(self, event: Continuation | Tagged | Bye) -> bytes:
        """Report a continuation/tagged/BYE line to the state; return what to relay for it."""
        if isinstance(event, Continuation):
            relay = self.state.continuation()
            if self._upstream_said is not None:
                self._upstream_said.set()
            return event.data if relay else b""
        if isinstance(event, Tagged):
            due = self.state.tagged(event.tag, event.status)
            if self._upstream_said is not None:
                self._upstream_said.set()
            if event.status != b"OK":
                self._advise(event.data)
            return event.data + due if due else event.data
        self.state.bye()
        self._advise(event.data)
        return event.data

    def _advise(self, line: bytes) -> None:
        for words, advice in UPSTREAM_ADVICE:
            if words.lower() in line.lower():
                shown = line.strip().decode("ascii", "replace")[:200]
                log.warning("imap %s: %s: upstream said %r: %s", self.client.peer, self.user,
                            shown, advice)
                return
