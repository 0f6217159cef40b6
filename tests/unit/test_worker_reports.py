"""gateway/admin/worker_reports.py: the other workers' reports as worker 0's admin port reads
them (fresh ones only) and adds them to its own figures."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gateway.admin.metrics import Metrics
from gateway.admin.worker_reports import (add_worker_sessions, combined_live, combined_metrics,
                                          read_reports)
from gateway.app import build
from gateway.server import GatewayServer
from tests.fixtures.gateway import make_config


def _server(tmp_path: Path, workers: int) -> GatewayServer:
    config = make_config(tmp_path, {
        "server": {"hostname": "localhost", "state_dir": "state", "workers": workers},
        "limits": {"worker_report_interval": 1},
        "listener": [{"protocol": "imap", "bind": "127.0.0.1:0", "tls": "none"}],
    })
    return build(config)[1]


def _report(worker: int, age: float, logins: int, sessions: int) -> dict[str, Any]:
    metrics = Metrics()
    for _ in range(logins):
        metrics({"type": "session.authenticated", "protocol": "imap"})
    metrics.upstream_latency.observe(0.2)
    row = {"protocol": "imap", "user": "bob", "peer": "127.0.0.1:5", "tls": False,
           "state": "authenticated", "upstream": "connected", "bytes_in": 3, "bytes_out": 4,
           "opened_at": time.time() - 5, "duration": 5.0}
    return {"worker": worker, "pid": 1, "time": time.time() - age, "metrics": metrics.to_json(),
            "sessions_by_protocol": {"imap": sessions}, "bytes_in_by_protocol": {"imap": 30},
            "bytes_out_by_protocol": {"imap": 40}, "dropped_subscribers": 0,
            "sessions": [row] * sessions}


def _write(server: GatewayServer, name: str, data: object) -> None:
    folder = server.config.server.state_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(data if isinstance(data, str) else json.dumps(data))


def test_fresh_reports_are_summed_and_stale_or_broken_ones_left_out(tmp_path: Path) -> None:
    server = _server(tmp_path, 4)
    _write(server, "1.json", _report(1, 0.5, logins=2, sessions=2))
    _write(server, "2.json", _report(2, 10, logins=100, sessions=9))  # killed long ago
    _write(server, "3.json", "{not json")
    reports = read_reports(server)
    assert [r.worker for r in reports] == [1]
    own = Metrics()
    own({"type": "session.authenticated", "protocol": "imap"})
    total = combined_metrics(own, reports)
    assert total.value("logins_total", protocol="imap", result="ok") == 3
    assert own.value("logins_total", protocol="imap", result="ok") == 1  # left unchanged
    assert total.upstream_latency.count == 1
    live = combined_live(server, reports)
    assert live.sessions_by_protocol["imap"] == 2 and live.bytes_in_by_protocol["imap"] == 30
    assert live.sessions_by_worker == {"0": 0, "1": 2}
    text = total.render(live)
    assert 'mailgate_worker_sessions{worker="1"} 2' in text
    assert 'mailgate_logins_total{protocol="imap",result="ok"} 3' in text
    snap = add_worker_sessions({"gateway": {}, "sessions": []}, server, reports)
    assert [s["worker"] for s in snap["sessions"]] == [1, 1] and snap["gateway"]["workers"] == 4


def test_one_worker_reads_no_report_and_shows_no_worker(tmp_path: Path) -> None:
    server = _server(tmp_path, 1)
    _write(server, "1.json", _report(1, 0, logins=2, sessions=2))
    assert read_reports(server) == []
    live = combined_live(server, [])
    assert live.sessions_by_worker == {}
    assert "mailgate_worker_sessions" not in Metrics().render(live)
    snap = {"gateway": {}, "sessions": []}
    assert add_worker_sessions(snap, server, []) == {"gateway": {}, "sessions": []}
