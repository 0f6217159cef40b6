"""Shared pytest fixtures: the real test lab (Dovecot + local OAuth server).

The lab fixtures are session-scoped and lazy: a test run that uses none of them starts
nothing. Under pytest-xdist every worker is its own process, so each worker gets its own lab.
Tests must not share mailboxes: take a fresh one from ``lab_user`` (or ``lab.new_user()``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lab import LabDovecot, LabOAuthServer


@pytest.fixture(scope="session")
def oauth_server() -> Iterator[LabOAuthServer]:
    """The session's :class:`LabOAuthServer` (client ``mailgate``/``secret``)."""
    with LabOAuthServer() as server:
        yield server


@pytest.fixture(scope="session")
def lab(oauth_server: LabOAuthServer) -> Iterator[LabDovecot]:
    """The session's :class:`LabDovecot`, validating tokens against ``oauth_server``."""
    with LabDovecot(oauth_server) as dovecot:
        yield dovecot


@pytest.fixture(autouse=True)
def _reset_oauth_server_settings(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used the shared OAuth server, undo its failure modes and switches."""
    server = request.getfixturevalue("oauth_server") if (
        "oauth_server" in request.fixturenames) else None
    yield
    if server is not None:
        server.reset_settings()


@pytest.fixture
def lab_user(lab: LabDovecot) -> str:
    """A fresh, empty mailbox name on ``lab`` (e.g. ``u7-1234@example.com``)."""
    return lab.new_user()
