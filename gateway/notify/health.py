"""Per-account health, from the gateway's events: what a person must be told, once per change.

Theory of operation
-------------------
:class:`HealthTracker` is sans-IO: it is fed the events of :mod:`gateway.events` and the time
(``now``, wall-clock seconds, given by the caller: tests pass any clock), and returns the
:class:`Notification`\\ s that a *change of state* calls for. It never does I/O and never
sleeps; :mod:`gateway.notify.notifier` drives it.

Rules, per account (a ``[users.X]`` name), written first:

1. **Re-authorization.** ``token.failed`` or ``upstream.error`` with reason
   ``reauthorization_required`` (and no ``feature``) while the account is not already known to
   need it → state *needs re-authorization*, notify ``account.reauthorization_required``
   (revoked or expired grant, ``invalid_grant``, Gmail's 7-day expiry of testing apps). Any
   number of further failures, logins or restarts (the state is persisted) notify nothing.
   ``token.refreshed``, ``account.authorized`` or ``upstream.connected`` end the state and
   notify ``account.reauthorized``.
2. **Failing upstream.** The first ``upstream.error`` or temporary ``token.failed`` (the
   server, the network, the identity provider being down) after a success starts a failure
   period. When failures have been *seen* over ``failing_after`` seconds (a failure at least
   that long after the first one) without one ``upstream.connected`` in between, notify
   ``upstream.failing`` once. Evidence, not the clock: one failure followed by silence (nobody
   tried again) is not an outage, and pages no one. The next ``upstream.connected`` ends the
   period; if ``failing`` was sent it notifies ``upstream.recovered`` (with how long it
   failed), else nothing: a blip shorter than the threshold, or an upstream that flaps faster
   than it, costs no one a page.
3. **A refused feature.** ``upstream.error`` with ``feature`` (``imap``, ``smtp``: the provider
   accepted the token but refuses IMAP or SMTP AUTH for the mailbox) notifies
   ``account.feature_refused`` once per feature; ``upstream.connected`` forgets the IMAP
   refusal (a later one notifies again).
4. **Certificate.** :meth:`HealthTracker.check_certificate` with the listener certificate's
   expiry notifies ``certificate.expiring`` once per certificate (its expiry time) when fewer
   than ``expiry_days`` days are left; a renewed certificate re-arms it.

Every notification carries ``type``, ``time``, a one-line ``summary`` and ``action`` (what the
admin does), plus the account's ``user`` / ``provider`` / ``upstream`` and the error ``detail``
where they apply — never a password, token or message body (event fields carry none).

:meth:`HealthTracker.snapshot` / :meth:`HealthTracker.restore` turn the state into plain JSON
data (for ``mailgate accounts`` and for a restart not to repeat notifications).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["AccountHealth", "HealthTracker", "Notification", "feature_action"]

REAUTH = "reauthorization_required"
DAY = 86400.0


@dataclass(frozen=True)
class Notification:
    type: str
    time: float
    summary: str
    action: str
    fields: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The JSON object a command or webhook receives."""
        return {"type": self.type, "time": round(self.time, 3), "summary": self.summary,
                "action": self.action, **self.fields}


@dataclass
class AccountHealth:
    """What is known about one account (plain data: persisted as JSON)."""

    provider: str = ""
    upstream: str = ""
    needs_reauthorization: bool = False
    reauthorization_detail: str = ""
    failing_since: float | None = None
    failing_notified: bool = False
    refused_features: list[str] = field(default_factory=list)
    last_error: str = ""
    last_error_at: float | None = None
    last_ok_at: float | None = None
    token_valid_until: float | None = None


def feature_action(feature: str, upstream_user: str = "") -> str:
    mailbox = f" {upstream_user}" if upstream_user else ""
    if feature == "smtp":
        return (f"enable SMTP AUTH for the mailbox{mailbox} (Microsoft 365: "
                "Set-CASMailbox -SmtpClientAuthenticationDisabled $false)")
    return (f"enable IMAP for the mailbox{mailbox} (Microsoft 365: Set-CASMailbox -ImapEnabled "
            "$true; Google Workspace: allow IMAP for the user's organizational unit), and check "
            "upstream_user and the app's permission on that mailbox")


class HealthTracker:
    def __init__(self, *, failing_after: float, expiry_days: int):
        self.failing_after = failing_after
        self.expiry_days = expiry_days
        self.accounts: dict[str, AccountHealth] = {}
        self.certificate_notified: float | None = None  # expiry time of the notified certificate
        self.changed = False  # set on every change; the driver clears it after persisting

    def _account(self, user: str) -> AccountHealth:
        health = self.accounts.get(user)
        if health is None:
            health = self.accounts[user] = AccountHealth()
        return health

    # ------------------------------------------------------------------ events

    def feed(self, event: dict[str, Any], now: float) -> list[Notification]:
        kind = event.get("type")
        user = event.get("user")
        if not isinstance(kind, str) or not isinstance(user, str) or not user:
            return []
        if kind not in ("token.failed", "token.refreshed", "account.authorized",
                        "upstream.error", "upstream.connected"):
            return []
        health = self._account(user)
        self.changed = True
        if isinstance(event.get("provider"), str):
            health.provider = event["provider"]
        if isinstance(event.get("upstream"), str):
            health.upstream = event["upstream"]
        detail = str(event.get("detail") or event.get("reason") or "")
        out: list[Notification] = []
        if kind in ("token.failed", "upstream.error"):
            health.last_error, health.last_error_at = detail, now
        if kind == "token.refreshed" and isinstance(event.get("valid_until"), (int, float)):
            health.token_valid_until = float(event["valid_until"])
        if kind in ("token.refreshed", "account.authorized", "upstream.connected"):
            out += self._reauthorized(user, health, now)
        if kind == "upstream.connected":
            health.last_ok_at = now
            out += self._connected(user, health, now)
        elif kind == "upstream.error" and isinstance(event.get("feature"), str):
            out += self._feature_refused(user, health, event["feature"], detail, now)
        elif event.get("reason") == REAUTH:
            out += self._needs_reauthorization(user, health, detail, now)
        else:  # upstream.error or token.failed, for any other reason
            if health.failing_since is None:
                health.failing_since = now
            out += self._check_failing(user, health, now)
        return out

    # ------------------------------------------------------------------ transitions

    def _needs_reauthorization(self, user: str, health: AccountHealth, detail: str,
                               now: float) -> list[Notification]:
        if health.needs_reauthorization:
            return []
        health.needs_reauthorization, health.reauthorization_detail = True, detail
        return [Notification(
            "account.reauthorization_required", now,
            f"account {user} needs to be authorized again: the identity provider refused its grant",
            f"run: mailgate authorize {user} (or open /authorize/{user} on the admin port)",
            self._fields(user, health, detail=detail),
        )]

    def _reauthorized(self, user: str, health: AccountHealth, now: float) -> list[Notification]:
        if not health.needs_reauthorization:
            return []
        health.needs_reauthorization, health.reauthorization_detail = False, ""
        self.changed = True
        return [Notification("account.reauthorized", now, f"account {user} works again",
                             "nothing", self._fields(user, health))]

    def _connected(self, user: str, health: AccountHealth, now: float) -> list[Notification]:
        out: list[Notification] = []
        if health.failing_notified and health.failing_since is not None:
            failed_for = round(now - health.failing_since, 1)
            out.append(Notification(
                "upstream.recovered", now,
                f"account {user}: upstream {health.upstream or '?'} works again "
                f"(failed for {failed_for:g} s)",
                "nothing", self._fields(user, health, failed_for=failed_for),
            ))
        health.failing_since, health.failing_notified = None, False
        if "imap" in health.refused_features:
            health.refused_features.remove("imap")
        return out

    def _feature_refused(self, user: str, health: AccountHealth, feature: str, detail: str,
                         now: float) -> list[Notification]:
        if feature in health.refused_features:
            return []
        health.refused_features.append(feature)
        return [Notification(
            "account.feature_refused", now,
            f"account {user}: the provider refuses {feature.upper()} for its mailbox",
            feature_action(feature), self._fields(user, health, feature=feature, detail=detail),
        )]

    def _check_failing(self, user: str, health: AccountHealth, now: float) -> list[Notification]:
        since = health.failing_since
        if since is None or health.failing_notified or now - since < self.failing_after:
            return []
        health.failing_notified = True
        self.changed = True
        return [Notification(
            "upstream.failing", now,
            f"account {user}: upstream {health.upstream or '?'} has been failing for "
            f"{round(now - since):d} s: {health.last_error}",
            "check the provider's service status and the network path (proxy, firewall, DNS); "
            "mailgate keeps trying and will say when it recovers",
            self._fields(user, health, since=since, detail=health.last_error),
        )]

    @staticmethod
    def _fields(user: str, health: AccountHealth, **extra: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {"user": user}
        if health.provider:
            fields["provider"] = health.provider
        if health.upstream:
            fields["upstream"] = health.upstream
        return {**fields, **extra}

    # ------------------------------------------------------------------ certificate

    def check_certificate(self, path: str, not_after: float, now: float) -> list[Notification]:
        """The listener certificate at ``path`` expires at ``not_after`` (wall clock)."""
        days_left = (not_after - now) / DAY
        if days_left >= self.expiry_days:
            if self.certificate_notified is not None:
                self.certificate_notified, self.changed = None, True
            return []
        if self.certificate_notified == not_after:
            return []
        self.certificate_notified, self.changed = not_after, True
        expired = days_left <= 0
        summary = (f"the listener certificate {path} has expired" if expired else
                   f"the listener certificate {path} expires in {days_left:.1f} days")
        return [Notification(
            "certificate.expiring", now, summary,
            f"renew {path} (e.g. certbot renew) and send SIGHUP to mailgate (docs/operations.md)",
            {"file": path, "not_after": round(not_after), "days_left": round(days_left, 1)},
        )]

    # ------------------------------------------------------------------ persistence

    def snapshot(self) -> dict[str, Any]:
        return {
            "accounts": {name: asdict(h) for name, h in sorted(self.accounts.items())},
            "certificate_notified": self.certificate_notified,
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Load a :meth:`snapshot` (unknown or malformed entries are skipped)."""
        accounts = data.get("accounts")
        if isinstance(accounts, dict):
            known = set(AccountHealth.__dataclass_fields__)
            for name, raw in accounts.items():
                if isinstance(name, str) and isinstance(raw, dict):
                    try:
                        self.accounts[name] = AccountHealth(
                            **{k: v for k, v in raw.items() if k in known})
                    except TypeError:
                        continue
        cert = data.get("certificate_notified")
        if isinstance(cert, (int, float)):
            self.certificate_notified = float(cert)
