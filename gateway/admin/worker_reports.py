"""``[server] workers = N``: each worker's figures, for the one admin port (worker 0).

Theory of operation
-------------------
Only worker 0 serves the admin port, yet ``/metrics`` and the status page must show every
worker. Rules:

1. A worker other than 0 counts its events with its own :class:`~gateway.admin.metrics.Metrics`
   observer and, every ``limits.worker_report_interval`` seconds, writes a *report* -- its
   counters, its live per-protocol session and byte figures, and its sessions as the status page
   lists them -- to ``state_dir/workers/<n>.json``. The write is atomic (a temporary file, then
   ``os.replace``): a reader sees the old report or the new one, never half of one.
2. The report is removed when the worker exits cleanly. A worker killed outright leaves its
   file behind; a report older than :data:`STALE_INTERVALS` intervals is therefore ignored (a
   restarted worker of the same number overwrites it).
3. Worker 0 writes no report: its admin app reads its own figures directly and adds the fresh
   reports of the others when a page or ``/metrics`` is requested. Counters are summed (the same
   series as with one process); open sessions are also given per worker
   (``mailgate_worker_sessions{worker="n"}``), and every session on the status page says which
   worker serves it.
4. With one worker nothing here runs and no file is written.

Reports hold what the status page and ``/metrics`` already show: no token, no password.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .metrics import LiveState, Metrics
from .status import sessions_snapshot

if TYPE_CHECKING:
    from ..server import GatewayServer

log = logging.getLogger("mailgate.workers")

STALE_INTERVALS = 3


@dataclass(frozen=True)
class WorkerReport:
    """One other worker's figures, as read from its file."""

    worker: int
    metrics: dict[str, Any]  # Metrics.to_json()
    sessions_by_protocol: dict[str, int]
    bytes_in_by_protocol: dict[str, int]
    bytes_out_by_protocol: dict[str, int]
    dropped_subscribers: int
    sessions: list[dict[str, Any]]  # status.sessions_snapshot() rows


def reports_dir(server: "GatewayServer") -> Path:
    return server.config.server.state_dir / "workers"


def live_figures(server: "GatewayServer") -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Open sessions, and bytes in and out of the live sessions, per protocol."""
    sessions: collections.Counter[str] = collections.Counter()
    bytes_in: collections.Counter[str] = collections.Counter()
    bytes_out: collections.Counter[str] = collections.Counter()
    for s in server.sessions:
        protocol = s.listener.protocol
        sessions[protocol] += 1
        bytes_in[protocol] += s.bytes_in
        bytes_out[protocol] += s.bytes_out
    return dict(sessions), dict(bytes_in), dict(bytes_out)


def _report(server: "GatewayServer", metrics: Metrics, worker: int) -> dict[str, Any]:
    now = time.time()
    sessions, bytes_in, bytes_out = live_figures(server)
    return {
        "worker": worker, "pid": os.getpid(), "time": now,
        "metrics": metrics.to_json(),
        "sessions_by_protocol": sessions, "bytes_in_by_protocol": bytes_in,
        "bytes_out_by_protocol": bytes_out,
        "dropped_subscribers": server.events.dropped_subscribers,
        "sessions": sessions_snapshot(server, now),
    }


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


async def run_reporter(server: "GatewayServer", worker: int) -> None:
    """Worker ``worker`` (not 0): write this worker's report every interval until cancelled,
    then remove it."""
    metrics = Metrics()
    server.events.observe(metrics)
    path = reports_dir(server) / f"{worker}.json"
    try:
        while True:
            try:
                _write(path, _report(server, metrics, worker))
            except OSError as exc:
                log.warning("worker %d: report not written (%s)", worker, exc)
            await trio.sleep(server.config.limits.worker_report_interval)
    finally:
        path.unlink(missing_ok=True)


def read_reports(server: "GatewayServer") -> list[WorkerReport]:
    """The fresh reports of the other workers (none with one worker). Blocking, but a few
    small local files: read in the request's task."""
    if server.config.server.worker_count <= 1:
        return []
    oldest = time.time() - STALE_INTERVALS * server.config.limits.worker_report_interval
    reports = []
    try:
        paths = sorted(reports_dir(server).glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if float(data["time"]) < oldest or int(data["worker"]) == 0:
                continue
            reports.append(WorkerReport(
                worker=int(data["worker"]), metrics=data["metrics"],
                sessions_by_protocol=data["sessions_by_protocol"],
                bytes_in_by_protocol=data["bytes_in_by_protocol"],
                bytes_out_by_protocol=data["bytes_out_by_protocol"],
                dropped_subscribers=int(data["dropped_subscribers"]),
                sessions=data["sessions"],
            ))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced, or not a report: skip it this time
    return sorted(reports, key=lambda r: r.worker)


def combined_metrics(own: Metrics, reports: list[WorkerReport]) -> Metrics:
    """Worker 0's counters plus the other workers' (``own`` is left unchanged)."""
    if not reports:
        return own
    total = Metrics()
    total.add(own.to_json())
    for report in reports:
        total.add(report.metrics)
    return total


def combined_live(server: "GatewayServer", reports: list[WorkerReport]) -> LiveState:
    """The scrape-time gauges of worker 0, plus the other workers' when there are several."""
    sessions, bytes_in, bytes_out = live_figures(server)
    totals = [collections.Counter(sessions), collections.Counter(bytes_in),
              collections.Counter(bytes_out)]
    dropped = server.events.dropped_subscribers
    by_worker: dict[str, int] = {}
    if server.config.server.worker_count > 1:
        by_worker["0"] = sum(sessions.values())
    for r in reports:
        for total, part in zip(totals, (r.sessions_by_protocol, r.bytes_in_by_protocol,
                                        r.bytes_out_by_protocol)):
            total.update({str(k): int(v) for k, v in part.items()})
        dropped += r.dropped_subscribers
        by_worker[str(r.worker)] = sum(int(v) for v in r.sessions_by_protocol.values())
    return LiveState(
        sessions_by_protocol=totals[0], bytes_in_by_protocol=totals[1],
        bytes_out_by_protocol=totals[2], draining=server.draining,
        dropped_subscribers=dropped, started_at=server.started_at,
        sessions_by_worker=by_worker,
    )


def add_worker_sessions(
    snap: dict[str, Any], server: "GatewayServer", reports: list[WorkerReport]
) -> dict[str, Any]:
    """The status snapshot of worker 0 with the other workers' sessions; with several workers
    every session says which worker serves it (``gateway.workers``: their count)."""
    count = server.config.server.worker_count
    if count <= 1:
        return snap
    sessions = [dict(s, worker=0) for s in snap["sessions"]]
    for r in reports:
        sessions.extend(dict(s, worker=r.worker) for s in r.sessions)
    snap["sessions"] = sorted(sessions, key=lambda s: float(s.get("opened_at") or 0))
    snap["gateway"]["workers"] = count
    snap["gateway"]["workers_reporting"] = [0] + [r.worker for r in reports]
    return snap
