"""A small fault-injecting TCP (and TLS-terminating) proxy for the fault suite.

Theory of operation
-------------------
:class:`FaultProxy` listens on ``127.0.0.1:<free port>`` and forwards every connection to a
target (the lab Dovecot, the lab OAuth server). Tests point mailgate's provider at the proxy and
arm :class:`Rule` objects to break the traffic at an exact point::

    mailgate ──(TLS)──▶ FaultProxy ──(TLS)──▶ Dovecot
              "up"  ───────────────────────▶
              ◀──────────────────────── "down"

Upstream IMAP is always TLS, so to see (and break) IMAP bytes the proxy terminates TLS on both
sides: ``server_tls`` is the context it presents to mailgate (a test CA mailgate is told to trust
via ``providers.X.ca_file``), ``client_tls`` the one it uses towards the target. Without them it
is a plain TCP proxy.

Each direction of each connection is a pump: read a chunk, look for the armed rules' patterns,
forward. A rule fires at most ``times`` times over the whole proxy (``None``: every time) and
then disarms; ``rule.fired`` is a ``trio.Event`` tests await to know the fault happened. Actions:

* ``drop``  -- forward up to ``after`` bytes past the end of the match, then close both sides
  (a connection that dies in the middle of a literal, of a command, of a QUIT).
* ``stall`` -- forward up to ``after`` bytes past the match, then forward nothing more in either
  direction; the sockets stay open (an upstream that hangs). Data still arriving is read and
  discarded so that the proxy notices when mailgate gives up and closes.
* ``reply`` -- (``up`` only) swallow the matching command line and answer mailgate with
  ``reply`` instead, where ``{tag}`` is the command's tag; ``close=True`` then closes the
  connection (Microsoft 365's ``* BYE Session invalidated - AccessTokenExpired``).

A rule with no pattern matches at the start of the stream (``after`` then counts from the first
byte). Patterns are regular expressions on bytes; the ``up`` direction is matched line by line
(mailgate's commands; an incomplete line waits for its end only while an ``up`` rule is
armed, so HTTP bodies pass at once), the ``down`` direction on the stream with a small look-behind window so
that a pattern split across two reads is still seen.

``open_connections`` counts live proxied connections: after a fault, the gateway must close its
side, which brings it back to zero.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

CHUNK = 65536
#: Bytes of earlier data kept to match patterns that straddle two reads.
LOOKBEHIND = 4096
#: An "up" line longer than this is forwarded without waiting for its CRLF.
MAX_UP_LINE = 65536
#: Deadline for the proxy's own TLS handshakes and target connect.
HANDSHAKE_TIMEOUT = 10.0

Direction = Literal["up", "down"]
Action = Literal["drop", "stall", "reply"]


@dataclass(eq=False)
class Rule:
    direction: Direction
    action: Action
    pattern: bytes | None = None
    after: int = 0
    reply: bytes = b""
    close: bool = False
    times: int | None = 1
    count: int = 0
    fired: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        if self.action == "reply" and self.direction != "up":
            raise ValueError("reply rules answer mailgate's commands: direction must be 'up'")
        self._regex = re.compile(self.pattern) if self.pattern is not None else None

    @property
    def armed(self) -> bool:
        return self.times is None or self.count < self.times


class _Stop(Exception):
    """Ends a proxied connection (both directions)."""


class _Side:
    """One end of a proxied connection; both pumps may write to it (a reply rule answers
    mailgate while the other pump relays the server), so writes take turns."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self._lock = trio.Lock()

    async def receive_some(self, max_bytes: int) -> bytes:
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes) -> None:
        async with self._lock:
            await self.stream.send_all(data)


class _Connection:
    def __init__(self, proxy: "FaultProxy", down: trio.abc.Stream, up: trio.abc.Stream):
        self.proxy = proxy
        self.client = _Side(down)  # mailgate's side
        self.server = _Side(up)  # the target's side
        self.stalled = False
        self.started = {"up": False, "down": False}  # whether a no-pattern rule was checked

    async def pump(self, direction: Direction) -> None:
        src, dst = (self.client, self.server) if direction == "up" else (self.server, self.client)
        pending = b""  # "up": an incomplete line; "down": the look-behind window
        countdown: tuple[int, Rule] | None = None
        while True:
            try:
                data = await src.receive_some(CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                data = b""
            if not data:
                raise _Stop
            if self.stalled:
                continue  # read and discard: notice the peer closing
            if countdown is not None:
                countdown, data = await self._count_down(countdown, data, dst)
                if countdown is not None or not data:
                    continue
            if direction == "up":
                pending += data
                pending, countdown = await self._pump_lines(pending, dst, src)
            else:
                window = pending + data
                countdown = await self._pump_stream(window, len(pending), dst)
                pending = window[-LOOKBEHIND:]

    async def _count_down(
        self, countdown: tuple[int, Rule], data: bytes, dst: _Side
    ) -> tuple[tuple[int, Rule] | None, bytes]:
        remaining, rule = countdown
        if len(data) < remaining:
            await dst.send_all(data)
            return (remaining - len(data), rule), b""
        await dst.send_all(data[:remaining])
        await self._act(rule)
        return None, b""

    async def _pump_stream(
        self, window: bytes, start: int, dst: _Side
    ) -> tuple[int, Rule] | None:
        """Forward window[start:]; apply the first armed 'down' rule that matches in it."""
        hit = self._first_match("down", window, start)
        if hit is None:
            await dst.send_all(window[start:])
            return None
        end, rule = hit
        return await self._cut(window[start:], end - start, rule, dst)

    async def _pump_lines(
        self, pending: bytes, dst: _Side, src: _Side
    ) -> tuple[bytes, tuple[int, Rule] | None]:
        """Forward complete lines of mailgate's commands, applying 'up' rules line by line."""
        out = bytearray()
        while True:
            nl = pending.find(b"\n")
            if nl < 0:
                if not self.proxy._armed("up"):  # nothing to match: never hold bytes back
                    out += pending
                    pending = b""
                    break
                if len(pending) <= MAX_UP_LINE:
                    break
                nl = len(pending) - 1
            line, pending = pending[: nl + 1], pending[nl + 1 :]
            hit = self._first_match("up", line, 0)
            if hit is None:
                out += line
                continue
            end, rule = hit
            if rule.action == "reply":
                if out:
                    await dst.send_all(bytes(out))
                    out.clear()
                tag = line.split(b" ", 1)[0].strip()
                await src.send_all(rule.reply.replace(b"{tag}", tag))
                if rule.close:
                    raise _Stop
                continue
            if out:
                await dst.send_all(bytes(out))
            return b"", await self._cut(line + pending, end, rule, dst)
        if out:
            await dst.send_all(bytes(out))
        return pending, None

    async def _cut(
        self, data: bytes, end: int, rule: Rule, dst: _Side
    ) -> tuple[int, Rule] | None:
        """Forward data up to ``end + rule.after`` bytes, then act (or count down the rest)."""
        limit = end + rule.after
        if limit > len(data):
            await dst.send_all(data)
            return limit - len(data), rule
        if limit:
            await dst.send_all(data[:limit])
        await self._act(rule)
        return None

    def _first_match(self, direction: Direction, data: bytes, start: int) -> tuple[int, Rule] | None:
        first = not self.started[direction]
        self.started[direction] = True
        for rule in self.proxy.rules:
            if rule.direction != direction or not rule.armed:
                continue
            if rule._regex is None:
                if first:
                    return self.proxy._fire(rule, start)
                continue
            for m in rule._regex.finditer(data):
                if m.end() > start:
                    return self.proxy._fire(rule, m.end())
        return None

    async def _act(self, rule: Rule) -> None:
        if rule.action == "drop":
            raise _Stop
        self.stalled = True


class FaultProxy:
    """A TCP/TLS proxy to ``target`` with armable faults; run it with ``nursery.start(p.run)``."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        server_tls: ssl.SSLContext | None = None,
        client_tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ):
        self.target = target
        self.server_tls = server_tls
        self.client_tls = client_tls
        self.server_hostname = server_hostname or target[0]
        self.rules: list[Rule] = []
        self.port = 0
        self.accepted = 0
        self.open_connections = 0
        self.peak_connections = 0  # most connections open at once
        self._idle = trio.Event()
        self._idle.set()
        self._scope = trio.CancelScope()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def arm(self, direction: Direction, action: Action, pattern: bytes | None = None,
            **kwargs: Any) -> Rule:
        """Add a rule (see the module docstring) and return it."""
        rule = Rule(direction, action, pattern, **kwargs)
        self.rules.append(rule)
        return rule

    def disarm(self) -> None:
        """Remove every rule: pass everything through again (new and running connections)."""
        self.rules.clear()

    async def wait_idle(self) -> None:
        """Wait until no proxied connection is open."""
        await self._idle.wait()

    def _armed(self, direction: Direction) -> bool:
        return any(r.direction == direction and r.armed for r in self.rules)

    def _fire(self, rule: Rule, position: int) -> tuple[int, Rule]:
        rule.count += 1
        rule.fired.set()
        return position, rule

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        with self._scope:
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    def stop(self) -> None:
        self._scope.cancel()

    async def _handle(self, raw: trio.SocketStream) -> None:
        self.accepted += 1
        self.open_connections += 1
        self.peak_connections = max(self.peak_connections, self.open_connections)
        if self.open_connections == 1:
            self._idle = trio.Event()
        down: trio.abc.Stream = raw
        up: trio.abc.Stream | None = None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                if self.server_tls is not None:
                    down = trio.SSLStream(raw, self.server_tls, server_side=True)
                    await down.do_handshake()
                up_raw = await trio.open_tcp_stream(*self.target)
                up = up_raw
                if self.client_tls is not None:
                    up = trio.SSLStream(up_raw, self.client_tls,
                                        server_hostname=self.server_hostname)
                    await up.do_handshake()
            conn = _Connection(self, down, up)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, conn, "up", nursery.cancel_scope)
                    nursery.start_soon(self._pump, conn, "down", nursery.cancel_scope)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                pass
        except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError):
            pass
        finally:
            with trio.CancelScope(shield=True):  # close both even when the test is ending
                for stream in (down, up):
                    if stream is not None:
                        await trio.aclose_forcefully(stream)
            self.open_connections -= 1
            if self.open_connections == 0:
                self._idle.set()

    @staticmethod
    async def _pump(conn: _Connection, direction: Direction, scope: trio.CancelScope) -> None:
        try:
            await conn.pump(direction)
        except _Stop:
            pass
        scope.cancel()
