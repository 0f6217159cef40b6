"""The event bus: what happened in the gateway, for the admin plane and the logs.

Theory of operation
-------------------
Front ends and the token manager call :meth:`EventBus.publish` with a small dict (``type`` plus
plain fields: user, protocol, peer, bytes, reason — never a password, token or message body).
``publish`` is synchronous and never blocks: it appends the event to a bounded ring of recent
events and offers it to every subscriber's bounded queue. A subscriber whose queue is full (a
stalled WebSocket client) is dropped instead of slowing anyone down: its channel is closed and it
sees end-of-stream. The gateway's speed never depends on how fast someone watches it.

Observers (:meth:`EventBus.observe`) are plain callables run synchronously inside ``publish``,
for consumers that must see *every* event and cost next to nothing (the admin plane's metric
counters). An observer must not block or raise; one that raises is logged and removed.

Event types (every event also has ``seq`` and ``time``)
-------------------------------------------------------
======================== =============================================================== =========
type                     fields                                                          publisher
======================== =============================================================== =========
session.opened           protocol, peer, listener, tls                                   server
session.authenticated    protocol, peer, user                                            front end
login.failed             protocol, peer, user (as typed), reason: bad_credentials |      front end
                         reauthorization_required | temporary | plaintext_refused
session.closed           protocol, peer, user, bytes_in, bytes_out, duration, outcome    server
upstream.connected       user, upstream (host:port), latency_ms; protocol: smtp for the  upstream
                         SMTP connections (IMAP's have none)
upstream.error           user, upstream (host:port), reason, detail (the message), and   upstream
                         feature (imap | smtp) when the provider refuses a whole feature
                         for the mailbox (:func:`upstream_error_event` builds it);
                         protocol as above
smtp.message             user, peer, rcpts, rcpts_refused, size, reply, reply_class,     front end
                         outcome: sent | refused_upstream | refused_size |
                         refused_bare_lf | upstream_failed | aborted; relay (no AUTH)
smtp.refused             peer, user, reason: auth_required | sender_not_owned            front end
token.refreshed          user, provider, valid_until (wall clock)                        oauth
token.failed             user, provider, reason: reauthorization_required | temporary,   oauth
                         detail (the OAuth error code or the message)
config.reloaded          users                                                           app
account.authorized       user, provider (an admin completed /authorize/USER)             admin
======================== =============================================================== =========
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from .errors import FeatureRefused, ReauthorizationRequired, TemporaryFailure, UpstreamError

log = logging.getLogger("mailgate.events")

RECENT_EVENTS = 200  # kept for the status page
SUBSCRIBER_QUEUE = 256  # events a subscriber may fall behind before it is dropped
MAX_DETAIL = 300  # characters of an error message kept in an event


def error_reason(exc: BaseException) -> str:
    """The ``reason`` of an ``upstream.error`` event for ``exc``."""
    if isinstance(exc, ReauthorizationRequired):
        return "reauthorization_required"
    if isinstance(exc, UpstreamError):
        return "upstream"
    if isinstance(exc, TemporaryFailure):
        return "temporary"
    return type(exc).__name__


def upstream_error_event(user: str, upstream: str, exc: BaseException) -> dict[str, Any]:
    """The ``upstream.error`` event for a failed upstream connection (IMAP or SMTP) of ``user``
    (a ``[users.X]`` name); the messages of mailgate's exceptions carry no secret."""
    event: dict[str, Any] = {
        "type": "upstream.error", "user": user, "upstream": upstream,
        "reason": error_reason(exc), "detail": str(exc)[:MAX_DETAIL],
    }
    if isinstance(exc, FeatureRefused):
        event["feature"] = exc.feature
    return event


class EventBus:
    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_EVENTS)
        self._subscribers: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self.dropped_subscribers = 0
        self._observers: list[Callable[[dict[str, Any]], None]] = []

    def publish(self, event: dict[str, Any]) -> dict[str, Any]:
        event = {"seq": next(self._seq), "time": round(time.time(), 3), **event}
        self.recent.append(event)
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:
                log.exception("event observer %r failed; removed", observer)
                self._observers.remove(observer)
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self._drop(channel)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(channel)
        return event

    def observe(self, observer: Callable[[dict[str, Any]], None]) -> None:
        """Call ``observer(event)`` synchronously for every event from now on."""
        self._observers.append(observer)

    def subscribe(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        """A channel of events from now on; it ends if the subscriber falls too far behind."""
        send, receive = trio.open_memory_channel[dict[str, Any]](SUBSCRIBER_QUEUE)
        self._subscribers.add(send)
        return receive

    def _drop(self, channel: trio.MemorySendChannel[dict[str, Any]]) -> None:
        self._subscribers.discard(channel)
        self.dropped_subscribers += 1
        channel.close()
