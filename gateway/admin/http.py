"""The admin port's I/O driver: accept, read one request with h11, answer it or hand it over.

Theory of operation
-------------------
:func:`serve_admin` is started by :func:`gateway.app.serve` next to the listeners
(``await nursery.start(serve_admin, server)``). It refuses to start when the port would be
reachable from other machines without an admin token, binds ``[admin] bind``, records the real
address in ``server.admin_address`` and reports ``started``.

Each connection carries exactly one request (responses say ``Connection: close``): the pages
are small and few, and one request per connection keeps the driver trivially correct.

Admission (:class:`AdmissionGate`) is designed so that no client can make the port, and
``/healthz`` in particular, unanswerable:

* At most ``limits.admin_connections_per_ip`` connections per address (an IPv6 /64) at once;
  more are closed unread.
* The whole request (head and body) must arrive within ``limits.admin_request_timeout``,
  the head limited to ``wire.MAX_HEAD_BYTES`` and the body to ``wire.MAX_BODY_BYTES``. While
  it is being read the connection holds nothing else; when :data:`MAX_READING` connections
  are reading at once, the one that has been at it longest is cut to make room (a slow-head
  flood from many addresses delays nobody who sends a request at once).
* ``GET /healthz`` is answered as soon as its head is read: it needs no slot. Other requests
  take one of :data:`MAX_CONNECTIONS` handler slots after their head was read (and so after
  the access check had what it needs); none free → 503 at once.
* A WebSocket upgrade for ``/events`` passes the same access check as any request and takes
  one of ``limits.admin_websockets`` stream slots (one address at most a quarter of them;
  none free → 503). It is then handed to :func:`gateway.admin.events_ws.serve_events` with
  every byte read so far, to be replayed to trio-websocket, which performs the handshake
  itself; a client that does not answer a ping within ``limits.admin_websocket_ping`` is
  dropped, so streams that never read do not hold their slots.
* Anything else goes to :meth:`AdminApp.handle <gateway.admin.routes.AdminApp.handle>`, bounded
  by :data:`HANDLER_TIMEOUT`, and the response is written in one ``send_all`` under
  :data:`SEND_TIMEOUT`.

A failure inside one request is logged (redacted by the logging filter) and answered with 500;
it never reaches the nursery. The connection is closed on every path.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import h11
import trio

from ..defence import address_key
from ..errors import ConfigError
from .access import is_loopback_host
from .events_ws import serve_events
from .routes import AdminApp
from .wire import MAX_BODY_BYTES, MAX_HEAD_BYTES, Request, Response, text

if TYPE_CHECKING:
    from ..config import Limits
    from ..server import GatewayServer

log = logging.getLogger("mailgate.admin")

HANDLER_TIMEOUT = 60.0  # seconds to produce an answer (token exchange, KDF, store)
SEND_TIMEOUT = 10.0  # seconds to write an answer
MAX_CONNECTIONS = 64  # requests handled at once (after their head was read; not /healthz)
MAX_READING = 256  # connections sending their request at once; the oldest is cut beyond
WEBSOCKET_SHARE = 4  # one address may hold at most 1/4 of limits.admin_websockets
HEALTH_PATH = "/healthz"
RECEIVE_SIZE = 16384
EVENTS_PATH = "/events"
BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
               b"Connection: close\r\n\r\nbad request\n")


class _Refused(Exception):
    def __init__(self, response: Response):
        self.response = response


async def serve_admin(server: "GatewayServer", *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    admin = server.config.admin
    if admin.token is None and not is_loopback_host(admin.host):
        raise ConfigError([
            f"admin.bind: {admin.bind} is not a loopback address: set admin.token or bind the "
            "admin port to 127.0.0.1"
        ])
    app = AdminApp(server)
    try:
        listeners = await trio.open_tcp_listeners(admin.port, host=admin.host)
    except OSError as exc:
        raise OSError(f"cannot listen on {admin.bind} (admin): {exc.strerror}") from None
    host, port = listeners[0].socket.getsockname()[:2]
    server.admin_address = (host, port)  # type: ignore[attr-defined]
    server.admin_app = app  # type: ignore[attr-defined]
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.info("admin plane on http://%s/%s", shown,
             " (admin token required)" if app.access.token_required else "")
    gate = AdmissionGate(server.config.limits)
    server.admin_gate = gate  # type: ignore[attr-defined]

    async def handler(stream: trio.SocketStream) -> None:
        await handle_connection(app, stream, gate)

    async with trio.open_nursery() as nursery:
        task_status.started((host, port))
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


class AdmissionGate:
    """Who may hold what on the admin port (see the module docstring): connections per
    address, the pool of connections still sending their request (oldest cut when full),
    handler slots and WebSocket slots."""

    def __init__(self, limits: "Limits"):
        self.per_address = limits.admin_connections_per_ip
        self.request_timeout = limits.admin_request_timeout
        self.ping_interval = limits.admin_websocket_ping
        self.max_websockets = limits.admin_websockets
        self.websockets_per_address = max(1, limits.admin_websockets // WEBSOCKET_SHARE)
        self.connections: collections.Counter[str] = collections.Counter()
        self.websockets: collections.Counter[str] = collections.Counter()
        self.reading: collections.OrderedDict[object, trio.CancelScope] = (
            collections.OrderedDict())
        self.handlers = trio.CapacityLimiter(MAX_CONNECTIONS)
        self.refused = 0  # connections closed unread (per-address cap)
        self.cut = 0  # connections cut to make room in the reading pool

    def admit(self, address: str) -> bool:
        if not _take(self.connections, address, self.per_address):
            self.refused += 1
            return False
        return True

    def leave(self, address: str) -> None:
        _drop(self.connections, address)

    @contextlib.contextmanager
    def reading_request(self) -> Iterator[trio.CancelScope]:
        """A deadline for the whole request; when :data:`MAX_READING` connections are already
        reading, the one that has been at it longest is cut to make room."""
        scope = trio.CancelScope(deadline=trio.current_time() + self.request_timeout)
        token = object()
        while len(self.reading) >= MAX_READING:
            _, oldest = self.reading.popitem(last=False)
            oldest.cancel()
            self.cut += 1
        self.reading[token] = scope
        try:
            with scope:
                yield scope
        finally:
            self.reading.pop(token, None)

    def take_websocket(self, address: str) -> bool:
        if sum(self.websockets.values()) >= self.max_websockets:
            return False
        return _take(self.websockets, address, self.websockets_per_address)

    def drop_websocket(self, address: str) -> None:
        _drop(self.websockets, address)


def _take(counts: collections.Counter[str], key: str, limit: int) -> bool:
    if counts[key] >= limit:
        return False
    counts[key] += 1
    return True


def _drop(counts: collections.Counter[str], key: str) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


async def handle_connection(app: AdminApp, stream: trio.SocketStream, gate: AdmissionGate) -> None:
    try:
        peer_host = stream.socket.getpeername()[0]
    except OSError:
        await trio.aclose_forcefully(stream)
        return
    address = address_key(peer_host)
    if not gate.admit(address):
        await trio.aclose_forcefully(stream)
        return
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        await _serve_one(app, stream, conn, peer_host, gate)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception as exc:  # one broken request must not take the admin plane down
        log.error("admin request from %s failed: %s: %s", peer_host, type(exc).__name__, exc,
                  exc_info=log.isEnabledFor(logging.DEBUG))
        if conn.our_state is h11.SEND_RESPONSE:
            with trio.move_on_after(SEND_TIMEOUT):
                try:
                    await stream.send_all(encode_response(conn, text("internal error\n", 500)))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
    finally:
        gate.leave(address)
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await stream.aclose()
        if scope.cancelled_caught:
            await trio.aclose_forcefully(stream)


async def _serve_one(
    app: AdminApp, stream: trio.SocketStream, conn: h11.Connection, peer_host: str,
    gate: AdmissionGate,
) -> None:
    request: Request | None = None
    raw = b""
    with gate.reading_request():
        try:
            request, raw = await read_request(stream, conn, peer_host)
        except h11.RemoteProtocolError:
            await stream.send_all(BAD_REQUEST)
            return
        except _Refused as refused:
            await stream.send_all(encode_response(conn, refused.response))
            return
    if request is None:
        return  # timed out, cut for a newer connection, or the client left
    if request.is_websocket_upgrade:
        await _serve_websocket(app, stream, conn, request, raw, gate)
        return
    if request.path == HEALTH_PATH and request.method == "GET":
        response = await app.handle(request)  # cheap and never waits: no handler slot
    else:
        try:
            gate.handlers.acquire_nowait()
        except trio.WouldBlock:
            response = text("the admin port is busy, try again\n", 503)
        else:
            try:
                with trio.move_on_after(HANDLER_TIMEOUT) as scope:
                    response = await app.handle(request)
                if scope.cancelled_caught:
                    response = text("the request took too long\n", 504)
            finally:
                gate.handlers.release()
    with trio.move_on_after(SEND_TIMEOUT):
        await stream.send_all(encode_response(conn, response))


async def _serve_websocket(
    app: AdminApp, stream: trio.SocketStream, conn: h11.Connection, request: Request,
    raw: bytes, gate: AdmissionGate,
) -> None:
    refusal = app.access.check(request)
    if refusal is None and request.path != EVENTS_PATH:
        refusal = text("no WebSocket here\n", 404)
    address = address_key(request.peer_host)
    if refusal is None and not gate.take_websocket(address):
        refusal = text("too many event streams, try again later\n", 503)
    if refusal is not None:
        with trio.move_on_after(SEND_TIMEOUT):
            await stream.send_all(encode_response(conn, refusal))
        return
    try:
        await serve_events(stream, raw, app.server.events, ping_interval=gate.ping_interval)
    finally:
        gate.drop_websocket(address)


async def read_request(
    stream: trio.abc.ReceiveStream, conn: h11.Connection, peer_host: str
) -> tuple[Request | None, bytes]:
    """Read one request. Returns (None, ...) if the client closed first. Raises
    ``h11.RemoteProtocolError`` for malformed input and ``_Refused`` for oversized input.
    Also returns every byte read, for a WebSocket handshake to replay."""
    raw = bytearray()
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            received = await stream.receive_some(RECEIVE_SIZE)
            # trio's streams return bytes (the type allows a bytearray): no copy.
            data = received if isinstance(received, bytes) else bytes(received)
            raw += data
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            head = event
            length = _content_length(event)
            if length is not None and length > MAX_BODY_BYTES:
                raise _Refused(text("request body too large\n", 413))
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise _Refused(text("request body too large\n", 413))
        elif isinstance(event, h11.EndOfMessage):
            break
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None, bytes(raw)
    assert head is not None
    request = Request(
        method=head.method.decode("ascii", "replace").upper(),
        target=head.target.decode("ascii", "replace"),
        headers=tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in head.headers),
        body=bytes(body),
        peer_host=peer_host,
    )
    return request, bytes(raw)


def _content_length(event: h11.Request) -> int | None:
    for name, value in event.headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def encode_response(conn: h11.Connection, response: Response) -> bytes:
    """The response framed by h11 (status line, headers, body), ready for one send_all."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.all_headers()]
    out = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
    out += conn.send(h11.Data(data=response.body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    return out
