"""The notifier: from the event bus to a person, without ever slowing a session.

Theory of operation
-------------------
One :class:`Notifier` is built per gateway (:func:`gateway.app.build_context`) and run as one
task in the app's nursery (:meth:`Notifier.run`).

* It *observes* the event bus (:meth:`gateway.events.EventBus.observe`): every event is fed,
  synchronously and in microseconds, to the sans-IO :class:`~gateway.notify.health.HealthTracker`,
  and the notifications a change of state calls for are put on a bounded queue
  (``limits.notify_queue``) with ``send_nowait``. A full queue drops the notification (logged),
  it never waits: publishing an event costs a session nothing more than before.
* :meth:`Notifier.run` consumes that queue in one task, delivering each notification in turn
  (:mod:`gateway.notify.delivery`: the ``[notify] command`` and the webhook); a second small
  task checks the listener certificate at start and every day, and writes the tracker's state
  to ``state_dir/health.json`` after a change (atomically, in a worker thread, at most once per
  ``HEALTH_WRITE_INTERVAL``), which ``mailgate accounts`` reads and a restart restores, so a
  restart repeats no notification.
* Every notification is also logged (warning; ``info`` for the good news), so an operator
  without ``[notify]`` still finds it in the log.
* SIGHUP (:meth:`Notifier.update_config`): new thresholds, command, webhook and certificate
  path; the tracker's state is kept.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from ..config import Config
from .delivery import deliver
from .health import HealthTracker, Notification

__all__ = ["HEALTH_FILE", "Notifier", "certificate_not_after", "read_health"]

log = logging.getLogger("mailgate.notify")

HEALTH_FILE = "health.json"
CERTIFICATE_CHECK_INTERVAL = 86400.0  # the listener certificate is checked daily (and at start)
HEALTH_WRITE_INTERVAL = 1.0  # health.json is rewritten at most this often
GOOD_NEWS = frozenset({"upstream.recovered", "account.reauthorized"})


def certificate_not_after(path: Path) -> float:
    """Expiry (wall clock) of the first certificate in the PEM file ``path``; raises
    ``OSError`` / ``ValueError``."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.not_valid_after_utc.timestamp()


def read_health(state_dir: Path) -> dict[str, Any]:
    """The persisted tracker state (empty when there is none or it cannot be read)."""
    try:
        data = json.loads((state_dir / HEALTH_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_health(state_dir: Path, data: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / HEALTH_FILE
    tmp = path.with_name(f".{HEALTH_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class Notifier:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time):
        self.config = config
        self._clock = clock
        self.tracker = HealthTracker(
            failing_after=config.notify.upstream_failing_after,
            expiry_days=config.notify.certificate_expiry_days,
        )
        self.tracker.restore(read_health(config.server.state_dir))
        self.tracker.changed = False
        self._send, self._receive = trio.open_memory_channel[Notification](
            config.limits.notify_queue)
        self.dropped = 0
        self.delivered = 0
        self._wake = trio.Event()

    # --------------------------------------------------------------- the bus side (sync)

    def observe(self, event: dict[str, Any]) -> None:
        """An :meth:`~gateway.events.EventBus.observe` callback: never blocks, never raises."""
        try:
            self._emit(self.tracker.feed(event, self._clock()))
        except Exception:  # a bug here must not take the event bus down
            log.exception("notifier: event %r not tracked", event.get("type"))
        if self.tracker.changed:
            self._wake.set()

    def _emit(self, notifications: list[Notification]) -> None:
        for notification in notifications:
            level = logging.INFO if notification.type in GOOD_NEWS else logging.WARNING
            log.log(level, "notify %s: %s (%s)", notification.type, notification.summary,
                    notification.action)
            try:
                self._send.send_nowait(notification)
            except trio.WouldBlock:
                self.dropped += 1
                log.error("notify: queue full (limits.notify_queue); %s not delivered",
                          notification.type)

    def update_config(self, config: Config) -> None:
        self.config = config
        self.tracker.failing_after = config.notify.upstream_failing_after
        self.tracker.expiry_days = config.notify.certificate_expiry_days
        self.check_certificate()

    # --------------------------------------------------------------- checks

    def check_certificate(self) -> None:
        config = self.config
        if not any(lst.tls != "none" for lst in config.listeners):
            return
        path = config.tls.cert_file
        try:
            not_after = certificate_not_after(path)
        except (OSError, ValueError) as exc:
            log.warning("notify: cannot read the listener certificate %s: %s", path, exc)
            return
        self._emit(self.tracker.check_certificate(str(path), not_after, self._clock()))
        if self.tracker.changed:
            self._wake.set()

    # --------------------------------------------------------------- the task

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._housekeeping)
            task_status.started()
            async for notification in self._receive:
                await deliver(notification, self.config)
                self.delivered += 1

    async def _housekeeping(self) -> None:
        self.check_certificate()
        next_certificate_check = trio.current_time() + CERTIFICATE_CHECK_INTERVAL
        while True:
            with trio.move_on_at(next_certificate_check):
                await self._wake.wait()
                await trio.sleep(HEALTH_WRITE_INTERVAL)  # coalesce a burst of changes
            self._wake = trio.Event()
            if trio.current_time() >= next_certificate_check:
                self.check_certificate()
                next_certificate_check = trio.current_time() + CERTIFICATE_CHECK_INTERVAL
            if self.tracker.changed:
                self.tracker.changed = False
                await self._persist()

    async def _persist(self) -> None:
        data = self.tracker.snapshot()
        data["written"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        try:
            await trio.to_thread.run_sync(_write_health, self.config.server.state_dir, data)
        except OSError as exc:
            log.error("notify: cannot write %s: %s",
                      self.config.server.state_dir / HEALTH_FILE, exc)
