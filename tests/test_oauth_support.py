"""Shared fixtures of the OAuth tests: a real lab OAuth server and configs pointing at it.

(No tests here; the other ``test_oauth_*`` modules import these fixtures.)
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.config import Config, parse_config
from tests.lab.oauth_server import LabOAuthServer

UPSTREAM_USER = "alice@example.com"
PASSWORD = "correct horse battery"


@pytest.fixture
def idp() -> Iterator[LabOAuthServer]:
    with LabOAuthServer() as server:
        yield server


def make_config(
    idp: LabOAuthServer, state_dir: Path, *, flow: str = "authorization_code",
    provider: dict[str, Any] | None = None, limits: dict[str, Any] | None = None,
    upstream_user: str = UPSTREAM_USER,
) -> Config:
    table: dict[str, Any] = {
        "imap": "127.0.0.1:993",
        "flow": flow,
        "authorize_url": idp.authorize_url,
        "token_url": idp.token_url,
        "device_url": idp.device_url,
        "scopes": ["mail"],
        "client_id": idp.client_id,
        "client_secret": idp.client_secret,
    }
    table.update(provider or {})
    raw = {
        "server": {"state_dir": str(state_dir)},
        "providers": {"lab": table},
        "users": {"alice": {"provider": "lab", "upstream_user": upstream_user}},
        "limits": {"auth_failure_delay": 0, "token_request_timeout": 5, **(limits or {})},
    }
    return parse_config(raw, base_dir=state_dir)


class Terminal(io.StringIO):
    """A stdout that tests can wait on: ``await term.wait_for("text")``."""

    async def wait_for(self, text: str, timeout: float = 10) -> str:
        with trio.fail_after(timeout):
            while text not in self.getvalue():
                await trio.sleep(0.01)
        return self.getvalue()

    def line_after(self, marker: str) -> str:
        lines = self.getvalue().splitlines()
        return next(lines[i + 1] for i, line in enumerate(lines) if marker in line)


def state_bytes(state_dir: Path) -> dict[str, bytes]:
    """Every file of the state directory with its content."""
    return {p.name: p.read_bytes() for p in sorted(state_dir.iterdir()) if p.is_file()}
