"""The listeners: accept connections, do implicit TLS, run one front-end session per connection.

Theory of operation
-------------------
:class:`GatewayServer` owns three nested scopes::

    run()
    └── nursery
        ├── accept scope: one trio.serve_listeners per [[listener]] (cancelled first at shutdown)
        └── connection nursery: one task per client connection, and the upstream pool's
              task (``ctx.connector.maintain``: logs pooled connections out when cancelled)
              └── _handle(): limits → implicit TLS → front end → close (always)

Every connection task is wrapped by :meth:`_handle`: whatever a session raises is logged (as one
line, redacted, with a traceback only at debug level) and the connection is closed; it never
reaches the nursery, so one broken session can never take the server down. A client that vanishes
mid-session is an ordinary end, not an error.

On a listener with ``proxy_protocol_from``, :func:`gateway.proxied.client_address` first reads
a load balancer's PROXY header (or screens a direct client for a forged one): every limit, log
line and event below sees the client's address it gives.

Limits applied before any protocol byte is read: ``limits.max_connections`` overall and
``limits.max_connections_per_ip``; a connection over a limit gets the protocol's own "try later"
line (``* BYE`` / ``-ERR [SYS/TEMP]``) and is closed.

Shutdown (:meth:`shutdown`, SIGTERM/SIGINT in the CLI): stop accepting, let running sessions
finish for ``limits.shutdown_grace`` seconds, then cancel them; cancelled sessions end without
entering POP3's UPDATE state, so nothing is deleted.

The handler for each protocol is :data:`FRONTENDS`'s; tests may pass their own.
"""

from __future__ import annotations

import collections
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

import trio

from .config import Config, ListenerConfig
from .context import GatewayContext
from .events import EventBus
from .frontends.imap_session import handle_imap
from .frontends.pop3_session import handle_pop3
from .frontends.smtp_session import handle_smtp
from .net import ClientStream, TLSHandshakeFailed
from .listeners import open_listeners
from .proxied import client_address

log = logging.getLogger("mailgate.server")

Handler = Callable[[ClientStream, GatewayContext], Awaitable[None]]

FRONTENDS: dict[str, Handler] = {"imap": handle_imap, "pop3": handle_pop3, "smtp": handle_smtp}

TOO_MANY = {
    "imap": b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
    "pop3": b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
    "smtp": b"421 4.7.0 Too many connections, try again later\r\n",
}


def make_server_ssl_context(config: Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if config.tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.load_cert_chain(str(config.tls.cert_file), str(config.tls.key_file))
    # Legacy clients resume sessions a lot; tickets save them a full handshake.
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


class GatewayServer:
    def __init__(
        self,
        ctx: GatewayContext,
        *,
        ssl_context: ssl.SSLContext | None = None,
        handlers: dict[str, Handler] | None = None,
    ):
        self.ctx = ctx
        self.ssl_context = ssl_context
        self._handlers = handlers or {}
        self.addresses: list[tuple[str, int]] = []  # bound address per listener, in config order
        self.active = 0
        self.sessions: set[ClientStream] = set()  # live connections, for the status page
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._accept_scope = trio.CancelScope()
        self._conn_scope = trio.CancelScope()
        self._idle = trio.Event()
        self._idle.set()
        self.draining = False
        self.finished = trio.Event()
        self.started_at = time.time()

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def events(self) -> EventBus:
        return self.ctx.events

    def handler_for(self, protocol: str) -> Handler:
        return self._handlers.get(protocol) or FRONTENDS[protocol]

    async def run(
        self, *, task_status: trio.TaskStatus[GatewayServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind every listener, report ``started``, serve until :meth:`shutdown` or cancelled."""
        needs_tls = any(lst.tls != "none" for lst in self.config.listeners)
        if needs_tls and self.ssl_context is None:
            self.ssl_context = make_server_ssl_context(self.config)
        bound: list[tuple[ListenerConfig, list[trio.SocketListener]]] = []
        try:
            for lst in self.config.listeners:
                try:
                    listeners = await open_listeners(
                        lst.host, lst.port, reuse_port=self.config.server.worker_count > 1
                    )
                except OSError as exc:
                    raise OSError(f"cannot listen on {lst.bind} ({lst.protocol}): {exc.strerror}") from None
                bound.append((lst, listeners))
                sockname = listeners[0].socket.getsockname()
                self.addresses.append((sockname[0], sockname[1]))
        except BaseException:
            for _, listeners in bound:
                for sl in listeners:
                    await sl.aclose()
            raise
        for lst, (host, port) in zip(self.config.listeners, self.addresses):
            log.info("listening on %s:%s (%s, tls=%s)", host, port, lst.protocol, lst.tls)
            if lst.tls == "none" and not lst.plaintext_auth_from and not lst.relay_from:
                log.warning(
                    "listener %s has tls = \"none\" and no plaintext_auth_from: nobody can log in "
                    "on it", lst.bind
                )
        try:
            with self._conn_scope:
                async with trio.open_nursery() as conn_nursery:
                    conn_nursery.start_soon(self.ctx.connector.maintain)  # the upstream pool
                    with self._accept_scope:
                        async with trio.open_nursery() as accept_nursery:
                            for lst, listeners in bound:
                                accept_nursery.start_soon(
                                    self._serve, lst, listeners, conn_nursery
                                )
                            task_status.started(self)
                    # Accepting has stopped (shutdown). Let sessions finish, within the grace.
                    for _, listeners in bound:
                        for sl in listeners:
                            await sl.aclose()
                    with trio.move_on_after(self.config.limits.shutdown_grace):
                        await self._idle.wait()
                    self._conn_scope.cancel()
        finally:
            for _, listeners in bound:
                for sl in listeners:
                    await trio.aclose_forcefully(sl)
            self.finished.set()

    async def _serve(
        self, lst: ListenerConfig, listeners: list[trio.SocketListener], conn_nursery: trio.Nursery
    ) -> None:
        async def handler(stream: trio.SocketStream) -> None:
            await self._handle(stream, lst)

        await trio.serve_listeners(handler, listeners, handler_nursery=conn_nursery)

    def shutdown(self) -> None:
        """Stop accepting; running sessions get ``limits.shutdown_grace`` seconds to finish."""
        self.draining = True
        self._accept_scope.cancel()

    async def _handle(self, raw: trio.SocketStream, lst: ListenerConfig) -> None:
        try:
            peer = raw.socket.getpeername()
        except OSError:
            await trio.aclose_forcefully(raw)
            return
        limits = self.config.limits
        # Behind a load balancer the client's address comes from its PROXY header.
        accepted = await client_address(raw, (peer[0], peer[1]), lst, limits)
        if accepted is None:
            await trio.aclose_forcefully(raw)
            return
        served, client = accepted
        ip = client[0]
        if self.active >= limits.max_connections or self._per_ip[ip] >= limits.max_connections_per_ip:
            log.warning("refused a connection from %s: too many connections", ip)
            await self._refuse(raw, lst)
            return
        self.active += 1
        self._per_ip[ip] += 1
        self._idle = trio.Event() if self.active == 1 else self._idle
        stream = ClientStream(
            served,
            peer=client,
            listener=lst,
            ssl_context=self.ssl_context,
            handshake_timeout=limits.tls_handshake_timeout,
        )
        self.sessions.add(stream)
        self.events.publish(
            {"type": "session.opened", "protocol": lst.protocol, "peer": stream.peer,
             "listener": lst.bind, "tls": lst.tls}
        )
        outcome = "closed"
        try:
            if lst.tls == "implicit":
                await stream.start_tls()
            await self.handler_for(lst.protocol)(stream, self.ctx)
        except TLSHandshakeFailed as exc:
            outcome = "tls_failed"
            log.info("%s %s: %s", lst.protocol, stream.peer, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            outcome = "client_gone"
            log.debug("%s %s: client went away", lst.protocol, stream.peer)
        except trio.Cancelled:
            outcome = "cancelled"
            raise
        except Exception as exc:  # a bug in one session must not end the others
            outcome = "error"
            log.error(
                "%s session from %s failed: %s: %s",
                lst.protocol,
                stream.peer,
                type(exc).__name__,
                exc,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
        finally:
            await stream.aclose()
            self._session_ended(stream, stream.outcome or outcome)
            self.sessions.discard(stream)
            self.active -= 1
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]
            if self.active == 0:
                self._idle.set()

    def _session_ended(self, stream: ClientStream, outcome: str) -> None:
        duration = round(time.time() - stream.opened_at, 3)
        lst = stream.listener
        # One line per session end: who, what, how much, how long, how it ended.
        log.info(
            "session end: protocol=%s user=%s peer=%s bytes_in=%d bytes_out=%d duration=%.3fs "
            "outcome=%s",
            lst.protocol, stream.user or "-", stream.peer, stream.bytes_in, stream.bytes_out,
            duration, outcome,
            extra={"fields": {"protocol": lst.protocol, "user": stream.user, "peer": stream.peer,
                              "bytes_in": stream.bytes_in, "bytes_out": stream.bytes_out,
                              "duration": duration, "outcome": outcome}},
        )
        self.events.publish(
            {"type": "session.closed", "protocol": lst.protocol, "peer": stream.peer,
             "user": stream.user, "bytes_in": stream.bytes_in, "bytes_out": stream.bytes_out,
             "duration": duration, "outcome": outcome}
        )

    async def _refuse(self, raw: trio.SocketStream, lst: ListenerConfig) -> None:
        # On implicit-TLS listeners the greeting would need a handshake; a plain close is the
        # cheapest honest answer there.
        with trio.move_on_after(1):
            try:
                if lst.tls != "implicit":
                    await raw.send_all(TOO_MANY[lst.protocol])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(raw)
