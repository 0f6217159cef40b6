"""The suite's layout, its markers, and the fixtures every test can name.

Layout (docs/testing.md): a test module lives in the folder of what it needs, and gets that
folder's marker here, so ``pytest tests/unit`` and ``pytest -m "not clients"`` both work:

* ``tests/unit/``    -- ``unit``: no lab; in-process, loopback sockets at most.
* ``tests/e2e/``     -- ``e2e``: the real gateway (or its parts) against the real lab.
* ``tests/clients/`` -- ``clients``: real external clients (curl, fetchmail, getmail6, mbsync,
  chromium) through the gateway to the lab.
* ``tests/faults/``  -- ``faults``: a fault-injecting proxy in the upstream path.

Every test that uses the lab (its fixtures, or marked so) also gets ``lab``, so that
``-m "not lab"`` runs what needs no Dovecot and no lab OAuth server. A unit test never
starts Dovecot: one that asks for the ``lab`` fixture is refused at collection. A few tests in
``tests/unit/`` talk to a lab OAuth server of their own (``idp``, an in-process HTTP server);
they are ``lab`` and not ``unit``.

Fixtures: the lab's (here: session-scoped and lazy, so a run that uses none of them starts
nothing; under pytest-xdist each worker gets its own lab), and the gateway fixtures of the
plugin modules in ``tests/fixtures/`` listed in ``pytest_plugins``. Test modules import helpers
from ``tests.fixtures``, never from each other. Tests must not share mailboxes: take a fresh one
from ``lab_user`` (or ``lab.new_user()``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import LabDovecot, LabOAuthServer

pytest_plugins = [
    "tests.fixtures.oauth", "tests.fixtures.imap", "tests.fixtures.pop3", "tests.fixtures.process",
    "tests.fixtures.smtp", "tests.fixtures.postgres",
]

TESTS = Path(__file__).resolve().parent
GROUPS = ("unit", "e2e", "clients", "faults")
#: The fixtures that start a part of the lab (``idp``: a lab OAuth server of the test's own).
LAB_FIXTURES = frozenset({"lab", "oauth_server", "idp"})


def group_of(path: Path) -> str:
    """The folder of tests/ that ``path`` is in; a test module elsewhere is a layout error."""
    parts = path.resolve().relative_to(TESTS).parts
    if len(parts) < 2 or parts[0] not in GROUPS:
        raise pytest.UsageError(
            f"{path}: a test module belongs in one of tests/{{{','.join(GROUPS)}}}/ "
            "(see docs/testing.md)")
    return parts[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test gets its folder's marker, and ``lab`` if it uses the lab (not ``unit`` then)."""
    for item in items:
        group = group_of(item.path)
        fixtures = set(item.fixturenames) if isinstance(item, pytest.Function) else set()
        if group == "unit" and "lab" in fixtures:
            raise pytest.UsageError(
                f"{item.nodeid}: a unit test starts no Dovecot (the 'lab' fixture): "
                "move it to tests/e2e/")
        uses_lab = bool(fixtures & LAB_FIXTURES) or item.get_closest_marker("lab") is not None
        if uses_lab:
            item.add_marker("lab")
        if group != "unit" or not uses_lab:
            item.add_marker(group)


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
