"""A real headless browser (Debian's chromium, driven over the Chrome DevTools protocol) uses
the admin plane: ``/authorize/USER`` against the lab OAuth server, then the live status page.

The DevTools protocol is JSON over a WebSocket; trio-websocket (already a dependency) is the
whole driver. Chromium runs in its own process group, ended by its id when the test ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from gateway.admin.http import serve_admin
from tests.fixtures.admin import AdminGate, imap_login, lab_config
from tests.fixtures.gateway import make_config, start_gateway
from tests.lab import LabDovecot, LabOAuthServer

pytestmark = pytest.mark.lab

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]
BROWSER_TIMEOUT = 30.0
PASSWORD = "bob's new \"local\" password"


class DevTools:
    """Just enough of the Chrome DevTools protocol: calls, one page, JavaScript evaluation."""

    def __init__(self, ws: WebSocketConnection):
        self.ws = ws
        self._id = 0
        self.session: str | None = None

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   page: bool = True) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if page and self.session:
            message["sessionId"] = self.session
        await self.ws.send_message(json.dumps(message))
        with trio.fail_after(BROWSER_TIMEOUT):
            while True:
                reply = json.loads(await self.ws.get_message())
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]

    async def open_page(self) -> None:
        target = await self.call("Target.createTarget", {"url": "about:blank"}, page=False)
        attached = await self.call("Target.attachToTarget",
                                   {"targetId": target["targetId"], "flatten": True}, page=False)
        self.session = attached["sessionId"]

    async def navigate(self, url: str) -> None:
        await self.call("Page.navigate", {"url": url})

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate",
                                 {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"].get("text", "exception"))
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = BROWSER_TIMEOUT) -> Any:
        """Poll a JavaScript expression until it is truthy (pages load and navigate meanwhile)."""
        with trio.fail_after(timeout):
            while True:
                try:
                    value = await self.evaluate(expression)
                except RuntimeError:  # the page was navigating: its context went away
                    value = None
                if value:
                    return value
                await trio.sleep(0.1)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[DevTools]:
    if not os.path.exists(CHROMIUM) or shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (.ci/setup installs it)")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    process = await trio.lowlevel.open_process(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        with trio.fail_after(BROWSER_TIMEOUT):
            while len(lines := _read_lines(port_file)) < 2:
                await trio.sleep(0.05)
        async with open_websocket_url(f"ws://127.0.0.1:{lines[0]}{lines[1]}",
                                      max_message_size=16 * 1024 * 1024) as ws:
            devtools = DevTools(ws)
            await devtools.open_page()
            yield devtools
    finally:
        _end_process_group(process.pid)
        with trio.move_on_after(10):
            await process.wait()


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def _end_process_group(pgid: int) -> None:
    for sig in (signal.SIGTERM,):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return


async def test_authorize_in_a_real_browser_then_log_in_over_imap(
    tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer, lab_user: str,
    nursery: trio.Nursery, browser: DevTools,
) -> None:
    config = make_config(tmp_path, lab_config(tmp_path, lab, oauth_server, {"alice": lab_user}))
    server = await start_gateway(nursery, config)
    await nursery.start(serve_admin, server)
    gate = AdminGate(config, server, lab_user, lab)

    # Not authorized yet: the gateway refuses the login.
    w = await gate.imap()
    assert (await imap_login(w, PASSWORD))[-1].startswith(b"L NO")
    await w.aclose()

    # The admin opens /authorize/alice; the lab IdP approves and redirects back to the
    # gateway's /oauth/callback, which asks for the new local password.
    await browser.navigate(f"http://{gate.admin}/authorize/alice")
    await browser.wait_for("document.getElementById('password-form') !== null")
    assert "127.0.0.1" in await browser.evaluate("location.host")
    assert await browser.evaluate("location.pathname") == "/oauth/callback"
    await browser.evaluate(
        f"document.getElementById('password').value = {json.dumps(PASSWORD)};"
        f"document.getElementById('confirm').value = {json.dumps(PASSWORD)};"
        "document.getElementById('submit').click(); true"
    )
    result = await browser.wait_for(
        "document.getElementById('result') && document.getElementById('result').textContent"
    )
    assert "alice can now log in" in result
    body = await browser.evaluate("document.body.innerText")
    for secret in oauth_server.all_secrets():
        assert secret not in body

    # The user logs in through IMAP with that password; the upstream session is real.
    w = await gate.imap()
    assert (await imap_login(w, PASSWORD))[-1].startswith(b"L OK")
    assert (await w.command(b"S SELECT INBOX"))[-1].startswith(b"S OK")

    # The status page, open in the browser, goes live and shows that session.
    await browser.navigate(f"http://{gate.admin}/")
    await browser.wait_for("document.getElementById('live').textContent === 'live'")
    await browser.wait_for("(document.getElementById('sessions') || {innerText: ''})"
                           ".innerText.includes('alice')")
    # ...and it follows the event stream: the session ends, the page updates by itself.
    await w.command(b"Z LOGOUT")
    await w.aclose()
    await browser.wait_for("document.getElementById('sessions-empty') !== null")
    events_text = await browser.evaluate("document.getElementById('events').innerText")
    assert "session.closed" in events_text and PASSWORD not in events_text
