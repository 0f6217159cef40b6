"""The SMTP connector: logged-in upstream SMTP connections, and what sending remembers per account.

Theory of operation
-------------------
One :class:`SmtpConnector` is built per gateway (:func:`gateway.app.build_context`) and reached
by the SMTP front end through the context; it implements :class:`gateway.ports.SmtpConnector`.

* **Connection cap.** One :class:`~gateway.upstream.slots.UpstreamSlots` per ``[users.X]`` name
  with ``limits.smtp_upstream_connections_per_account`` slots -- a cap apart from the IMAP
  one, so a scanner sending never takes a phone's IMAP connection. :meth:`SmtpConnector.open`
  takes a slot and logs in (:func:`gateway.upstream.smtp.open_smtp`); the connection releases
  it when closed. A reload keeps the slots of accounts whose cap did not change.
* **What the provider offers.** A client's EHLO comes before its AUTH, so before mailgate knows
  the account. :meth:`SmtpConnector.extensions` returns the EHLO extensions last seen from a
  provider's server (from any logged-in connection, or from one unauthenticated probe:
  connect, EHLO, QUIT), cached for :data:`EXTENSIONS_TTL` seconds; one probe at a time per
  server; ``None`` if the server cannot be reached (the front end then offers only what needs
  nothing from the upstream), and no new probe for :data:`PROBE_RETRY` seconds after a failed
  one (a provider outage must not make every EHLO wait).
* **Sending rate.** :meth:`SmtpConnector.try_send` counts the messages each account handed on
  within the last hour (a sliding window of timestamps) against
  ``limits.smtp_messages_per_user_per_hour``.
* **What went wrong.** :meth:`SmtpConnector.note_problem` keeps each account's last
  explained provider answer (:mod:`gateway.upstream.smtp_answers`) for the status page
  (``/metrics`` counts the front end's ``smtp.message`` events).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import trio

from ..config import Config, Limits, ProviderConfig
from ..errors import MailgateError
from ..ports import TokenSource
from .slots import UpstreamSlots, kept_slots
from .login import Publish
from .smtp import UpstreamSMTP, connect_smtp, open_smtp

__all__ = ["EXTENSIONS_TTL", "SmtpConnector", "SmtpProblem"]

#: How long a provider's EHLO extensions are trusted before they are probed again.
EXTENSIONS_TTL = 3600.0
#: The window of ``limits.smtp_messages_per_user_per_hour``.
RATE_WINDOW = 3600.0
#: How long a probe of a provider's extensions may take (the client is waiting for EHLO).
PROBE_TIMEOUT = 10.0
#: After a failed probe, EHLOs answer without the provider's extensions for this long.
PROBE_RETRY = 60.0


@dataclass(frozen=True)
class SmtpProblem:
    """The last explained provider answer of an account (nothing secret)."""

    when: float
    reply: str
    key: str
    advice: str


class SmtpConnector:
    def __init__(self, config: Config, *, publish: Publish | None = None) -> None:
        self._limits: Limits = config.limits
        self._publish = publish
        self._slots: dict[str, UpstreamSlots] = {}
        self._extensions: dict[str, tuple[float, dict[str, str]]] = {}
        self._probing: dict[str, trio.Lock] = {}
        self._probe_failed: dict[str, float] = {}  # server -> when its last probe failed
        self._sent: dict[str, collections.deque[float]] = {}
        self.problems: dict[str, SmtpProblem] = {}

    def slots(self, account: str) -> UpstreamSlots:
        slots = self._slots.get(account)
        if slots is None:
            slots = UpstreamSlots(account, capacity=self._limits.smtp_upstream_connections_per_account,
                                  wait=self._limits.upstream_slot_wait)
            self._slots[account] = slots
        return slots

    async def open(self, account: TokenSource) -> UpstreamSMTP:
        client = await open_smtp(account, self._limits, slots=self.slots(account.name),
                                 publish=self._publish)
        if account.provider.smtp is not None:
            self._extensions[account.provider.smtp] = (time.monotonic(), dict(client.extensions))
        self.problems.pop(account.name, None)
        return client

    async def extensions(self, provider: ProviderConfig) -> dict[str, str] | None:
        if provider.smtp is None:
            return None
        lock = self._probing.setdefault(provider.smtp, trio.Lock())
        async with lock:  # one probe at a time per server: concurrent EHLOs wait for it
            now = time.monotonic()
            cached = self._extensions.get(provider.smtp)
            if cached is not None and now - cached[0] < EXTENSIONS_TTL:
                return cached[1]
            failed = self._probe_failed.get(provider.smtp)
            if failed is not None and now - failed < PROBE_RETRY:
                return cached[1] if cached is not None else None
            try:
                with trio.fail_after(PROBE_TIMEOUT):
                    client = await connect_smtp(
                        provider.smtp_host, provider.smtp_port, tls=provider.smtp_tls,
                        ca_file=provider.ca_file, proxy=provider.upstream_proxy,
                        connect_timeout=self._limits.upstream_connect_timeout,
                        command_timeout=self._limits.upstream_command_timeout,
                        data_timeout=self._limits.smtp_data_timeout,
                    )
                    await client.quit(self._limits.logout_timeout)
            except (MailgateError, trio.TooSlowError):
                self._probe_failed[provider.smtp] = time.monotonic()
                return cached[1] if cached is not None else None
            extensions = dict(client.extensions)
            self._extensions[provider.smtp] = (time.monotonic(), extensions)
            return extensions

    def try_send(self, account: str) -> bool:
        """Count one message against the account's hourly limit; False when it is used up."""
        now = time.monotonic()
        sent = self._sent.setdefault(account, collections.deque())
        while sent and now - sent[0] >= RATE_WINDOW:
            sent.popleft()
        if len(sent) >= self._limits.smtp_messages_per_user_per_hour:
            return False
        sent.append(now)
        return True

    def note_problem(self, account: str, reply: str, key: str, advice: str) -> None:
        self.problems[account] = SmtpProblem(time.time(), reply, key, advice)

    def update_config(self, config: Config) -> None:
        limits = config.limits
        self._slots = kept_slots(self._slots, config.users, limits.smtp_upstream_connections_per_account,
                                 limits.upstream_slot_wait)
        self._limits = limits
        self.problems = {k: v for k, v in self.problems.items() if k in config.users}
