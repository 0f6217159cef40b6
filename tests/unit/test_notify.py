"""Notifications without the lab: the sans-IO health tracker with a made-up clock, the command and
the webhook delivery against a real local HTTP server, and the notifier's queue."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import trio

from gateway.events import EventBus, upstream_error_event
from gateway.errors import FeatureRefused, ReauthorizationRequired, UpstreamError
from gateway.notify.delivery import post_webhook, run_command
from gateway.notify.health import HealthTracker, Notification
from gateway.notify.notifier import Notifier, read_health
from tests.fixtures.gateway import make_config
from tests.fixtures.notify import WebhookReceiver, notify_command, pages, wait_for

DAY = 86400.0


def types(notes: list[Notification]) -> list[str]:
    return [n.type for n in notes]


def revoked(user: str = "alice") -> dict[str, Any]:
    return {"type": "token.failed", "user": user, "provider": "gmail",
            "reason": "reauthorization_required", "detail": "invalid_grant"}


def down(user: str = "alice") -> dict[str, Any]:
    return upstream_error_event(user, "imap.example:993", UpstreamError("cannot connect to imap.example:993"))


def up(user: str = "alice") -> dict[str, Any]:
    return {"type": "upstream.connected", "user": user, "upstream": "imap.example:993", "latency_ms": 5}


def test_a_revoked_grant_is_notified_once_until_it_works_again() -> None:
    tracker = HealthTracker(failing_after=60, expiry_days=14)
    first = tracker.feed(revoked(), 100)
    assert types(first) == ["account.reauthorization_required"]
    note = first[0].as_json()
    assert note["user"] == "alice" and note["provider"] == "gmail" and note["detail"] == "invalid_grant"
    assert note["action"].startswith("run: mailgate authorize alice")
    # Every later failure of the same state: nothing (also the upstream side of the same refusal).
    fresh_token_refused = upstream_error_event(
        "alice", "imap.example:993", ReauthorizationRequired("alice", "rejected a fresh token"))
    for t in range(101, 200):
        assert tracker.feed(revoked(), t) == []
        assert tracker.feed(fresh_token_refused, t) == []
    assert types(tracker.feed({"type": "token.refreshed", "user": "alice", "valid_until": 5000.0}, 300)) == [
        "account.reauthorized"]
    assert tracker.accounts["alice"].token_valid_until == 5000.0
    assert types(tracker.feed(revoked(), 400)) == ["account.reauthorization_required"]  # a new state
    assert tracker.feed(revoked("bob"), 400)[0].fields["user"] == "bob"  # per account


def test_a_flapping_upstream_notifies_failing_once_and_recovered_once() -> None:
    tracker = HealthTracker(failing_after=30, expiry_days=14)
    out: list[Notification] = []
    # Short blips (failures, then a success within the threshold) never page anyone.
    for start in (0, 100, 200):
        out += tracker.feed(down(), start) + tracker.feed(down(), start + 10)
        out += tracker.feed(down(), start + 20) + tracker.feed(up(), start + 25)
    assert out == []
    # A failure period longer than the threshold: one "failing", whatever the number of errors.
    for t in range(1000, 1100, 5):
        out += tracker.feed(down(), t)
    assert types(out) == ["upstream.failing"]
    assert out[0].time == 1030  # the first failure 30 s after the first one
    assert out[0].fields["since"] == 1000 and "cannot connect" in out[0].fields["detail"]
    # The next success: one "recovered", with how long it failed; successes after it: nothing.
    out += tracker.feed(up(), 1200) + tracker.feed(up(), 1201)
    assert types(out) == ["upstream.failing", "upstream.recovered"]
    assert out[1].fields["failed_for"] == 200
    # One failure and then silence (nobody tried again) is no outage: no page, however long.
    assert tracker.feed(down(), 2000) == []
    assert tracker.feed(up(), 9000) == []
    # It fails long enough again: a new state, a new notification.
    assert tracker.feed(down(), 10000) == [] and tracker.feed(down(), 10029) == []
    assert types(tracker.feed(down(), 10030)) == ["upstream.failing"]


def test_a_refused_feature_is_notified_once_per_feature() -> None:
    tracker = HealthTracker(failing_after=30, expiry_days=14)
    imap = upstream_error_event("alice", "outlook.office365.com:993", FeatureRefused(
        "alice", "imap", "BAD User is authenticated but not connected."))
    smtp = upstream_error_event("alice", "smtp.office365.com:587", FeatureRefused(
        "alice", "smtp", "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"))
    assert imap["feature"] == "imap" and imap["reason"] == "reauthorization_required"
    first = tracker.feed(imap, 1)
    assert types(first) == ["account.feature_refused"]
    assert "Set-CASMailbox -ImapEnabled" in first[0].action
    assert tracker.feed(imap, 2) == [] and tracker.feed(imap, 1000) == []
    assert not tracker.accounts["alice"].needs_reauthorization  # not a dead grant
    assert "SmtpClientAuthenticationDisabled" in tracker.feed(smtp, 3)[0].action
    assert tracker.feed(smtp, 4) == []
    tracker.feed(up(), 5)  # IMAP works again: a later refusal is news again
    assert types(tracker.feed(imap, 6)) == ["account.feature_refused"]


def test_certificate_expiry_is_notified_once_per_certificate() -> None:
    tracker = HealthTracker(failing_after=30, expiry_days=14)
    assert tracker.check_certificate("/c.pem", 100 * DAY, 0) == []
    soon = tracker.check_certificate("/c.pem", 100 * DAY, 90 * DAY)
    assert types(soon) == ["certificate.expiring"] and soon[0].fields["days_left"] == 10
    assert tracker.check_certificate("/c.pem", 100 * DAY, 91 * DAY) == []  # daily check: once
    renewed = 190 * DAY
    assert tracker.check_certificate("/c.pem", renewed, 91 * DAY) == []
    assert types(tracker.check_certificate("/c.pem", renewed, 180 * DAY)) == ["certificate.expiring"]
    expired = tracker.check_certificate("/d.pem", 200 * DAY, 201 * DAY)
    assert "has expired" in expired[0].summary


def test_the_state_survives_a_restart() -> None:
    tracker = HealthTracker(failing_after=30, expiry_days=14)
    tracker.feed(revoked(), 1)
    tracker.feed(down("bob"), 1)
    assert types(tracker.feed(down("bob"), 100)) == ["upstream.failing"]
    tracker.check_certificate("/c.pem", 5 * DAY, 0)
    saved = json.loads(json.dumps(tracker.snapshot()))
    again = HealthTracker(failing_after=30, expiry_days=14)
    again.restore({**saved, "accounts": {**saved["accounts"], "junk": "x", "odd": {"nope": 1}}})
    assert again.feed(revoked(), 200) == [] and again.feed(down("bob"), 300) == []
    assert again.check_certificate("/c.pem", 5 * DAY, DAY) == []
    assert types(again.feed(up("bob"), 400)) == ["upstream.recovered"]


def test_unrelated_or_malformed_events_are_ignored() -> None:
    tracker = HealthTracker(failing_after=0, expiry_days=14)
    for event in ({"type": "session.opened"}, {"type": "token.failed"}, {"user": "x"},
                  {"type": "login.failed", "user": "alice", "reason": "reauthorization_required"}):
        assert tracker.feed(event, 1) == []
    assert tracker.accounts == {}


# ------------------------------------------------------------------ delivery


async def test_command_gets_the_notification_on_stdin_and_is_bounded(tmp_path: Path) -> None:
    command, out = notify_command(tmp_path)
    body = json.dumps({"type": "x", "user": "alice"}).encode()
    assert await run_command(command, body, timeout=10)
    assert pages(out) == [{"type": "x", "user": "alice"}]
    started = trio.current_time()
    assert not await run_command([sys.executable, "-c", "import time; time.sleep(30)"], body, timeout=0.5)
    assert trio.current_time() - started < 5
    assert not await run_command([sys.executable, "-c", "raise SystemExit(3)"], body, timeout=10)
    assert not await run_command([str(tmp_path / "missing")], body, timeout=10)


async def test_webhook_retries_with_backoff_then_delivers(tmp_path: Path) -> None:
    with WebhookReceiver(statuses=[500, 503]) as hook:
        config = make_config(tmp_path, {
            "notify": {"webhook_url": hook.url, "webhook_token": "hook-token-0123456789"},
            "limits": {"notify_webhook_backoff": 0.2, "notify_webhook_attempts": 3},
        })
        started = trio.current_time()
        assert await post_webhook(config, b'{"type": "x"}')
        assert trio.current_time() - started >= 0.2 + 0.4  # 0.2 s, then doubled
        assert [r["status"] for r in hook.requests] == [500, 503, 200]
        assert hook.requests[-1]["headers"]["Authorization"] == "Bearer hook-token-0123456789"
        assert hook.requests[-1]["headers"]["Content-Type"] == "application/json"
        assert hook.notifications == [{"type": "x"}]
    with WebhookReceiver(statuses=[400]) as hook:
        config = make_config(tmp_path, {"notify": {"webhook_url": hook.url},
                                        "limits": {"notify_webhook_backoff": 0}})
        assert not await post_webhook(config, b"{}")
        assert len(hook.requests) == 1  # a 4xx is not retried
    config = make_config(tmp_path, {"notify": {"webhook_url": "http://127.0.0.1:1/hook"},
                                    "limits": {"notify_webhook_backoff": 0, "notify_webhook_attempts": 2}})
    assert not await post_webhook(config, b"{}")


async def test_notifier_delivers_through_a_bounded_queue_and_persists(tmp_path: Path) -> None:
    command, out = notify_command(tmp_path)
    with WebhookReceiver() as hook:
        config = make_config(tmp_path, {
            "server": {"state_dir": "state"},
            "notify": {"command": command, "webhook_url": hook.url, "upstream_failing_after": 0.2},
            "limits": {"notify_queue": 2},
        })
        bus = EventBus()
        notifier = Notifier(config)
        bus.observe(notifier.observe)
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run)
            bus.publish(revoked())
            bus.publish(revoked())
            bus.publish(down("bob"))
            await trio.sleep(0.3)
            bus.publish(down("bob"))  # still failing after upstream_failing_after
            await wait_for(lambda: len(hook.notifications) == 2)
            assert [n["type"] for n in hook.notifications] == [
                "account.reauthorization_required", "upstream.failing"]
            await wait_for(lambda: len(pages(out)) == 2)
            assert [p["type"] for p in pages(out)] == [n["type"] for n in hook.notifications]
            await wait_for(lambda: "bob" in read_health(config.server.state_dir).get("accounts", {}))
            # A full queue drops, it never blocks the publisher.
            for user in ("c", "d", "e", "f", "g", "h"):
                bus.publish(revoked(user))
            assert notifier.dropped >= 1
            nursery.cancel_scope.cancel()
    health = read_health(config.server.state_dir)["accounts"]
    assert health["alice"]["needs_reauthorization"] and health["bob"]["failing_notified"]
    # A new notifier (a restart) restores the state and repeats nothing.
    again = Notifier(config)
    assert again.tracker.feed(revoked(), 1.0) == []
    assert again.tracker.feed(up("bob"), 2.0)[0].type == "upstream.recovered"
