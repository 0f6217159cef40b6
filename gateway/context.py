"""What every session needs from the running gateway, passed explicitly (no global state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import Config
from .events import EventBus

if TYPE_CHECKING:  # imported lazily: the OAuth package is optional for the config tools
    from .oauth.accounts import AccountManager


@dataclass
class GatewayContext:
    config: Config
    accounts: "AccountManager"
    events: EventBus
