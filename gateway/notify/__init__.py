"""Notifications: telling a person what needs them, once per change of state.

* :mod:`gateway.notify.health` -- the sans-IO tracker: events and a clock in, notifications out;
* :mod:`gateway.notify.notifier` -- the trio side: observes the event bus, one bounded queue,
  one consumer task, the daily certificate check, ``state_dir/health.json``;
* :mod:`gateway.notify.delivery` -- the ``[notify] command`` and the webhook (retries, back-off);
* :mod:`gateway.notify.report` -- ``mailgate accounts``: every account's state, for admins
  without a browser.
"""

from .health import HealthTracker, Notification
from .notifier import Notifier

__all__ = ["HealthTracker", "Notification", "Notifier"]
