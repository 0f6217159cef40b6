"""The RFC 8252 loopback redirect receiver of the authorization-code flow.

Theory of operation
-------------------
``mailgate authorize`` listens on ``127.0.0.1`` on a port the kernel picks and uses
``http://127.0.0.1:PORT/`` as the redirect URI. After the admin approves in a browser, the
identity provider redirects the browser there with ``?code=...&state=...`` (or ``?error=...``).

Each incoming connection is served in its own task (browsers open spare connections and ask
for ``/favicon.ico``), reading at most ``MAX_REQUEST_HEAD`` bytes for at most
``REQUEST_READ_TIMEOUT`` seconds with h11. A request whose ``state`` matches and that carries
``code`` or ``error`` ends the wait; anything else gets a short answer and is ignored (a
mismatching ``state`` is a forged or stale redirect). The code itself is never logged.
"""

from __future__ import annotations

import html
import urllib.parse

import h11
import trio

MAX_REQUEST_HEAD = 16 * 1024
REQUEST_READ_TIMEOUT = 10.0
RECEIVE_CHUNK = 4096
LOOPBACK_HOST = "127.0.0.1"

_DONE_PAGE = (
    "<!doctype html><meta charset=utf-8><title>mailgate</title>"
    "<p>{message}</p><p>You can close this window.</p>"
)


class LoopbackReceiver:
    """Listens for one authorization redirect. Use ``async with await LoopbackReceiver.open()``."""

    def __init__(self, listener: trio.SocketListener):
        self._listener = listener
        self.port: int = listener.socket.getsockname()[1]
        self.redirect_uri = f"http://{LOOPBACK_HOST}:{self.port}/"
        self._result: dict[str, str] | None = None

    @classmethod
    async def open(cls) -> "LoopbackReceiver":
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK_HOST)
        for extra in listeners[1:]:
            await extra.aclose()
        return cls(listeners[0])

    async def __aenter__(self) -> "LoopbackReceiver":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._listener.aclose()

    async def wait(self, *, state: str) -> dict[str, str]:
        """The query parameters of the first redirect carrying ``state`` and a code or error."""
        async with trio.open_nursery() as nursery:
            while self._result is None:
                stream = await self._listener.accept()
                nursery.start_soon(self._serve, stream, state, nursery.cancel_scope)
        assert self._result is not None
        return self._result

    async def _serve(self, stream: trio.SocketStream, state: str, done: trio.CancelScope) -> None:
        async with stream:
            with trio.move_on_after(REQUEST_READ_TIMEOUT):
                try:
                    await self._answer(stream, state, done)
                except (h11.RemoteProtocolError, trio.BrokenResourceError):
                    pass

    async def _answer(self, stream: trio.SocketStream, state: str, done: trio.CancelScope) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_CHUNK)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.Request):
                break
            return
        target = urllib.parse.urlsplit(event.target.decode("ascii", "replace"))
        params = dict(urllib.parse.parse_qsl(target.query))
        status, message = self._judge(params, state)
        body = _DONE_PAGE.format(message=html.escape(message)).encode("utf-8")
        headers = [
            ("Content-Type", "text/html; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        if status == 200 and self._result is None:
            self._result = params
            done.cancel()

    @staticmethod
    def _judge(params: dict[str, str], state: str) -> tuple[int, str]:
        if "code" not in params and "error" not in params:
            return 404, "Not an authorization redirect."
        if params.get("state") != state:
            return 400, "This redirect does not belong to the running authorization."
        if "error" in params:
            return 200, f"Authorization refused: {params['error']}."
        return 200, "mailgate received the authorization."
