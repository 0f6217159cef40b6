"""``GET /events``: the event bus as a WebSocket of JSON messages, one event per message.

Theory of operation
-------------------
The HTTP driver has already read the upgrade request with h11. :class:`ReplayStream` gives
trio-websocket (``wrap_server_stream``) the bytes read so far, then the live connection, so
trio-websocket performs the handshake itself on the very same TCP connection.

The subscription is taken *before* the handshake is answered: a client that has its
``101 Switching Protocols`` sees every event published after it, in order (``seq`` increases
by one per event gateway-wide; a gap means events this client was not subscribed for).

Backpressure never reaches the gateway. ``EventBus.publish`` only offers each event to the
subscriber's bounded queue and drops a subscriber whose queue is full; on top of that, every
send has a deadline (:data:`SEND_TIMEOUT`). A stalled client therefore ends up dropped with close
code 1013 ("try again later") — or, if it does not even read the close frame, cut off after
:data:`CLOSE_TIMEOUT`. A client that reads nothing at all is found without waiting for events
to back up: it is pinged every ``ping_interval`` (``limits.admin_websocket_ping``) and dropped
when no pong comes back within as long. Messages from the client are read and ignored (they must be read so
that trio-websocket can answer pings and see the close).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from ..events import EventBus

log = logging.getLogger("mailgate.admin")

HANDSHAKE_TIMEOUT = 10.0  # seconds for the WebSocket handshake
SEND_TIMEOUT = 10.0  # seconds one event may take to go out before the client is dropped
CLOSE_TIMEOUT = 2.0  # seconds for a polite close before the connection is cut
MAX_INCOMING_MESSAGE = 4096  # clients have nothing to say; keep their messages small
CLOSE_TOO_SLOW = 1013  # RFC 6455 §7.4.1 "Try Again Later"


class ReplayStream(trio.abc.Stream):
    """A stream that first returns ``replay``, then reads from ``stream``."""

    def __init__(self, stream: trio.abc.Stream, replay: bytes):
        self._stream = stream
        self._replay = bytearray(replay)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._replay:
            n = len(self._replay) if max_bytes is None else min(max_bytes, len(self._replay))
            chunk = bytes(self._replay[:n])
            del self._replay[:n]
            return chunk
        received = await self._stream.receive_some(max_bytes)
        return received if isinstance(received, bytes) else bytes(received)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


def encode_event(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"), default=str)


async def serve_events(stream: trio.abc.Stream, replay: bytes, bus: EventBus,
                       *, ping_interval: float | None = None) -> None:
    """Run one event-stream client until it leaves, stalls or the admin plane stops. With
    ``ping_interval``, the client is pinged that often and dropped when it does not answer
    within as long (a client that never reads answers nothing)."""
    async with trio.open_nursery() as nursery:
        events = bus.subscribe()
        with events:
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
                request = await wrap_server_stream(
                    nursery, ReplayStream(stream, replay), max_message_size=MAX_INCOMING_MESSAGE
                )
                ws = await request.accept()
            if handshake.cancelled_caught:
                nursery.cancel_scope.cancel()
                return
            nursery.start_soon(_ignore_incoming, ws, nursery.cancel_scope)
            with trio.CancelScope() as pump_scope:
                if ping_interval is not None:
                    nursery.start_soon(_keep_alive, ws, ping_interval, pump_scope)
                reason = await _pump(ws, events)
            if pump_scope.cancelled_caught:
                reason = "no answer to ping"
            await _close(ws, reason)
            nursery.cancel_scope.cancel()


async def _pump(ws: WebSocketConnection, events: trio.MemoryReceiveChannel[dict[str, Any]]) -> str:
    """Send events until the client goes or falls behind; return why it ended."""
    try:
        async for event in events:
            with trio.move_on_after(SEND_TIMEOUT) as scope:
                await ws.send_message(encode_event(event))
            if scope.cancelled_caught:
                return "stalled"
    except ConnectionClosed:
        return "closed"
    return "too slow"  # the bus dropped this subscriber


async def _keep_alive(ws: WebSocketConnection, interval: float, pump: trio.CancelScope) -> None:
    """Ping every ``interval``; no pong within ``interval`` ends the pump (the stream is
    dropped)."""
    try:
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as scope:
                await ws.ping()
            if scope.cancelled_caught:
                pump.cancel()
                return
    except ConnectionClosed:
        pass


async def _ignore_incoming(ws: WebSocketConnection, scope: trio.CancelScope) -> None:
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed:
        scope.cancel()


async def _close(ws: WebSocketConnection, reason: str) -> None:
    if reason == "closed":
        return
    log.info("event stream client %s dropped: %s", _remote(ws), reason)
    with trio.move_on_after(CLOSE_TIMEOUT) as scope:
        scope.shield = True
        try:
            await ws.aclose(CLOSE_TOO_SLOW, "too slow, reconnect")
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _remote(ws: WebSocketConnection) -> str:
    try:
        return str(ws.remote)
    except Exception:
        return "?"
