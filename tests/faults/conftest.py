"""Fixtures of the fault suite: ``rig`` (see :mod:`tests.faults.support`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.faults.support import Rig, start_rig
from tests.fixtures.imap import SeededState
from tests.lab import LabDovecot, LabOAuthServer


@pytest.fixture
async def rig(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
              oauth_server: LabOAuthServer, seeded_state: SeededState) -> Rig:
    return await start_rig(nursery, tmp_path, lab, oauth_server, seeded_state)
