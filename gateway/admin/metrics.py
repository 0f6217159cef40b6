"""Prometheus metrics, counted from the event bus and rendered in the text exposition format.

Theory of operation
-------------------
:class:`Metrics` is an :meth:`EventBus.observe <gateway.events.EventBus.observe>` observer: it
sees every event synchronously as it is published and only bumps integers, so counting costs the
gateway nothing measurable and can never fall behind (unlike a WebSocket subscriber, an observer
is never dropped). Gauges that describe *now* (open sessions, draining) are not counted: they are
read from the server at scrape time and passed to :meth:`Metrics.render`.

Byte counters stay monotonic although they mix both sources: a session's bytes move from the
live sum to the closed total in the same synchronous step in which the server publishes
``session.closed`` and forgets the stream (no scrape can run in between).

Labels are low-cardinality by design: protocol, outcome, reason and result come from the fixed
vocabularies documented in :mod:`gateway.events`; user names are never labels (see the status
page for per-user detail). This module does no I/O and imports no trio.

With ``[server] workers`` > 1 the other workers' counters arrive as :meth:`Metrics.to_json`
data (:mod:`gateway.admin.worker_reports`) and are summed with :meth:`Metrics.add`: the series
stay those of one process; only ``mailgate_worker_sessions`` carries a ``worker`` label.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PROTOCOLS = ("imap", "pop3", "smtp")
# Upstream connect + authenticate latency buckets, seconds (providers answer in 0.1–2 s).
UPSTREAM_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelKey = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class LiveState:
    """What the server looks like at scrape time."""

    sessions_by_protocol: Mapping[str, int]
    bytes_in_by_protocol: Mapping[str, int]  # received from clients, live sessions only
    bytes_out_by_protocol: Mapping[str, int]  # sent to clients, live sessions only
    draining: bool
    dropped_subscribers: int
    started_at: float
    # [server] workers > 1: open sessions per worker number (empty with one worker).
    sessions_by_worker: Mapping[str, int] = dataclasses.field(default_factory=dict)


class Histogram:
    def __init__(self, buckets: Iterable[float]):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    def __init__(self) -> None:
        self.counters: dict[str, collections.Counter[LabelKey]] = collections.defaultdict(
            collections.Counter
        )
        self.upstream_latency = Histogram(UPSTREAM_LATENCY_BUCKETS)

    def _inc(self, name: str, amount: int = 1, **labels: Any) -> None:
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        self.counters[name][key] += amount

    def __call__(self, event: Mapping[str, Any]) -> None:
        """The bus observer: count one event."""
        kind = event.get("type")
        protocol = event.get("protocol") or "unknown"
        if kind == "session.opened":
            self._inc("sessions_opened_total", protocol=protocol)
        elif kind == "session.authenticated":
            self._inc("logins_total", protocol=protocol, result="ok")
        elif kind == "login.failed":
            self._inc("logins_total", protocol=protocol, result="failed")
            self._inc("login_failures_total", protocol=protocol, reason=event.get("reason", "unknown"))
        elif kind == "session.closed":
            self._inc("sessions_closed_total", protocol=protocol, outcome=event.get("outcome", "closed"))
            self._inc("closed_bytes", int(event.get("bytes_in") or 0), protocol=protocol, direction="in")
            self._inc("closed_bytes", int(event.get("bytes_out") or 0), protocol=protocol, direction="out")
        elif kind == "token.refreshed":
            self._inc("token_refreshes_total", result="ok")
        elif kind == "token.failed":
            self._inc("token_refreshes_total", result="failed")
            self._inc("token_failures_total", reason=event.get("reason", "unknown"))
        elif kind == "smtp.message":
            self._inc("smtp_messages_total", outcome=event.get("outcome", "unknown"))
            self._inc("smtp_upstream_replies_total", **{"class": event.get("reply_class", "none")})
            if event.get("outcome") == "sent":
                self._inc("smtp_message_bytes_total", int(event.get("size") or 0))
        elif kind == "upstream.connected" and event.get("protocol") != "smtp":
            latency_ms = event.get("latency_ms")
            if isinstance(latency_ms, (int, float)):
                self.upstream_latency.observe(latency_ms / 1000.0)
        elif kind == "upstream.error":
            self._inc("upstream_errors_total", reason=event.get("reason", "unknown"))
        elif kind == "config.reloaded":
            self._inc("config_reloads_total")

    def to_json(self) -> dict[str, Any]:
        """The counters as JSON-able data (a worker's report, :mod:`gateway.admin.worker_reports`)."""
        h = self.upstream_latency
        return {
            "counters": {name: [[list(map(list, key)), value] for key, value in c.items()]
                         for name, c in self.counters.items()},
            "latency": {"counts": h.counts, "count": h.count, "sum": h.sum},
        }

    def add(self, data: Mapping[str, Any]) -> None:
        """Add another worker's :meth:`to_json` figures to these."""
        for name, samples in data["counters"].items():
            for key, value in samples:
                self.counters[name][tuple((str(k), str(v)) for k, v in key)] += int(value)
        latency = data["latency"]
        h = self.upstream_latency
        if len(latency["counts"]) == len(h.counts):
            h.counts = [a + int(b) for a, b in zip(h.counts, latency["counts"])]
            h.count += int(latency["count"])
            h.sum += float(latency["sum"])

    def value(self, name: str, **labels: Any) -> float:
        return self.counters[name][tuple(sorted((k, str(v)) for k, v in labels.items()))]

    # --- rendering ------------------------------------------------------------------------

    def render(self, live: LiveState) -> str:
        out: list[str] = []
        _metric(out, "mailgate_up", "gauge", "1 while the gateway runs.", [({}, 1)])
        _metric(out, "mailgate_draining", "gauge", "1 while shutting down (no new sessions).",
                [({}, int(live.draining))])
        _metric(out, "mailgate_start_time_seconds", "gauge", "Unix time the gateway started.",
                [({}, round(live.started_at, 3))])
        protocols = sorted(set(PROTOCOLS) | set(live.sessions_by_protocol))
        _metric(out, "mailgate_sessions", "gauge", "Client sessions open now.",
                [({"protocol": p}, live.sessions_by_protocol.get(p, 0)) for p in protocols])
        if live.sessions_by_worker:
            _metric(out, "mailgate_worker_sessions", "gauge",
                    "Client sessions open now, by worker process ([server] workers).",
                    [({"worker": w}, n) for w, n in sorted(live.sessions_by_worker.items(),
                                                          key=lambda item: int(item[0]))])
        self._counter(out, "sessions_opened_total", "Client connections accepted.",
                      base=[{"protocol": p} for p in protocols])
        self._counter(out, "sessions_closed_total", "Client sessions ended, by outcome.")
        self._counter(out, "logins_total", "Client logins, by result.",
                      base=[{"protocol": p, "result": r} for p in protocols for r in ("ok", "failed")])
        self._counter(out, "login_failures_total", "Failed client logins, by reason.")
        bytes_samples = []
        for p in protocols:
            for direction, live_bytes in (("in", live.bytes_in_by_protocol),
                                          ("out", live.bytes_out_by_protocol)):
                total = self.value("closed_bytes", protocol=p, direction=direction)
                bytes_samples.append(({"protocol": p, "direction": direction},
                                      int(total) + live_bytes.get(p, 0)))
        _metric(out, "mailgate_client_bytes_total", "counter",
                "Bytes relayed with clients (in: from clients, out: to clients).", bytes_samples)
        self._counter(out, "token_refreshes_total", "Access-token requests to identity providers.",
                      base=[{"result": "ok"}, {"result": "failed"}])
        self._counter(out, "token_failures_total", "Failed token requests, by reason.")
        self._histogram(out)
        self._counter(out, "upstream_errors_total", "Upstream IMAP failures, by reason.")
        self._counter(out, "smtp_messages_total", "SMTP messages, by outcome (sent: the upstream took it).",
                      base=[{"outcome": "sent"}])
        self._counter(out, "smtp_message_bytes_total", "Octets of the SMTP messages sent.", base=[{}])
        self._counter(out, "smtp_upstream_replies_total",
                      "The upstream's final reply to each SMTP message, by class (none: no reply).")
        self._counter(out, "config_reloads_total", "Configurations reloaded (SIGHUP).", base=[{}])
        _metric(out, "mailgate_event_subscribers_dropped_total", "counter",
                "Event-stream consumers dropped for falling behind.",
                [({}, live.dropped_subscribers)])
        return "\n".join(out) + "\n"

    def _counter(
        self, out: list[str], name: str, help_text: str, base: Iterable[Mapping[str, str]] = ()
    ) -> None:
        values = collections.Counter(self.counters[name])
        for labels in base:  # always show the main series, even at zero
            values[tuple(sorted(labels.items()))] += 0
        samples = [(dict(key), value) for key, value in sorted(values.items())]
        _metric(out, f"mailgate_{name}", "counter", help_text, samples)

    def _histogram(self, out: list[str]) -> None:
        h = self.upstream_latency
        name = "mailgate_upstream_connect_seconds"
        out.append(f"# HELP {name} Upstream IMAP connect, TLS and authentication time.")
        out.append(f"# TYPE {name} histogram")
        for bound, count in zip(h.buckets, h.counts):
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {count}')
        out.append(f'{name}_bucket{{le="+Inf"}} {h.count}')
        out.append(f"{name}_sum {_number(h.sum)}")
        out.append(f"{name}_count {h.count}")


def _metric(
    out: list[str], name: str, kind: str, help_text: str,
    samples: Iterable[tuple[Mapping[str, str], float]],
) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        out.append(f"{name}{_labels(labels)} {_number(value)}")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    return str(int(value))
