"""What every session needs from the running gateway, passed explicitly (no global state).

One :class:`GatewayContext` is built by :func:`gateway.app.build_context` and handed to every
session. Its parts are typed by the protocols of :mod:`gateway.ports`, so the front ends and the
admin plane depend on what they use, not on the classes that implement it (tests put fakes in).
A SIGHUP replaces ``config`` and tells ``accounts`` and ``connector``; sessions already running
keep the objects they started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import Config
from .events import EventBus
from .ports import Accounts, CredentialStore, Pop3StateStore, SmtpConnector, UpstreamConnector

if TYPE_CHECKING:
    from .notify.notifier import Notifier


@dataclass
class GatewayContext:
    config: Config
    accounts: Accounts
    events: EventBus
    connector: UpstreamConnector
    store: CredentialStore
    # Observes ``events``; run by ``gateway.app.serve`` (None: no notifications, e.g. in tests).
    notifier: Notifier | None = None
    # Sending (SMTP submission); None in contexts built without it (SMTP listeners then refuse).
    smtp: SmtpConnector | None = None
    # The POP3 listings and size caches: files under ``state_dir/pop3/``, or the PostgreSQL
    # store with ``[store] url`` (None in contexts built without it: the files).
    pop3_state: Pop3StateStore | None = None
