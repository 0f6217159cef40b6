"""Receivers for the notification tests: a real HTTP webhook server and a notify command."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trio

COMMAND_SCRIPT = """\
import sys
data = sys.stdin.read()
with open(sys.argv[1], "a") as f:
    f.write(data.replace("\\n", " ") + "\\n")
"""


class WebhookReceiver:
    """A real HTTP server on loopback recording every POST; ``statuses`` are answered first
    (one per request), then 200."""

    def __init__(self, statuses: list[int] | None = None):
        self.statuses = list(statuses or [])
        self.requests: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.requests.append({
                    "path": self.path, "headers": dict(self.headers), "status": status,
                    "json": json.loads(body) if body else None,
                })
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/hook"

    @property
    def notifications(self) -> list[dict[str, Any]]:
        """The accepted notifications (requests answered 200)."""
        return [r["json"] for r in self.requests if r["status"] == 200]

    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def notify_command(tmp_path: Path) -> tuple[list[str], Path]:
    """A ``[notify] command`` that appends each notification (one line) to a file."""
    script = tmp_path / "page-admin.py"
    script.write_text(COMMAND_SCRIPT)
    out = tmp_path / "pages.jsonl"
    return [sys.executable, str(script), str(out)], out


def pages(out: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


async def wait_for(predicate: Any, timeout: float = 15, what: str = "") -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
