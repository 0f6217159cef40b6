"""``python -m bench.scale``: figure 2 (logins/s) beyond one process.

Measures, in one run on one machine, the login rate of figure 2 (``bench/figures.py``: 50
concurrent clients, each connect → TLS → LOGIN → LOGOUT in a loop, sessions spread over 4
accounts, clients in 2 load processes) for:

* ``workers = 1`` and ``workers = 2`` (SQLite store): the worker ratio (target ≥ 1.6);
* one instance on a PostgreSQL store, direct, and two instances on that store behind HAProxy
  (TCP mode, ``send-proxy-v2``, round robin): the HAProxy ratio; plus the login latency of a
  single sequential client both ways (the added latency of the HAProxy hop).

Every gateway is a real ``mailgate serve`` process against the lab (Dovecot + OAuth server in
their own process), PostgreSQL and HAProxy are the test lab's (``tests/lab/``). Prints a table
and writes ``bench/results/scale.json``. See docs/performance.md ("Beyond one process").
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import ssl
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from statistics import median
from typing import Any

from bench.figures import LOGIN_USERS, upstream_name
from bench.gateway_proc import GatewayProcess, GatewayUser, authorize_users, free_port, write_config
from bench.labproc import LabInfo, LabProcess
from bench.load import LoadPool, LoadSpec, login_loop
from bench.wire import Credentials, Endpoint, client_context, imap_login
from tests.lab.haproxy import Frontend, LabHAProxy
from tests.lab.postgres import LabPostgres

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "scale.json"
CLIENTS = 50
WARM_UP_LOGINS = 8  # per account: enough for each worker to verify each password once


def _configure(directory: Path, info: LabInfo, users: list[GatewayUser], port: int,
               certs: Path, *, workers: int, store_url: str | None, proxied: bool) -> Path:
    path = write_config(directory, info, users, {"imap": port})
    text = path.read_text()
    text = text.replace('state_dir = "state"', f'state_dir = "state"\nworkers = {workers}')
    text = text.replace('"certs/mailgate.pem"', json.dumps(str(certs / "mailgate.pem")))
    text = text.replace('"certs/mailgate.key"', json.dumps(str(certs / "mailgate.key")))
    if proxied:
        text = text.replace('\ntls = "implicit"',
                            '\ntls = "implicit"\nproxy_protocol_from = ["127.0.0.1/32"]')
    if store_url:
        text += f"[store]\nurl = {json.dumps(store_url)}\n"
    path.write_text(text)
    return path


@contextmanager
def gateways(work: Path, lab: LabProcess, info: LabInfo, users: list[GatewayUser], *,
             workers: int = 1, instances: int = 1, store_url: str | None = None,
             haproxy: bool = False) -> Iterator[Endpoint]:
    certs = work / "certs"
    ports = [free_port() for _ in range(instances)]
    with ExitStack() as stack:
        for i, port in enumerate(ports):
            config = _configure(work / f"gw{i}", info, users, port, certs, workers=workers,
                                store_url=store_url, proxied=haproxy)
            if i == 0 or store_url is None:  # a shared store is authorized once
                authorize_users(sys.executable, ROOT, config, users,
                                lambda upstream: lab.issue_tokens(upstream)[1])
            stack.enter_context(GatewayProcess(sys.executable, ROOT, config, [port]))
        port = ports[0]
        if haproxy:
            proxy = LabHAProxy([Frontend("imap", [("127.0.0.1", p) for p in ports])])
            proxy.start()
            stack.callback(proxy.stop)
            port = proxy.address("imap")[1]
        yield Endpoint("127.0.0.1", port, certs / "mailgate-ca.pem")


def measure(endpoint: Endpoint, users: list[GatewayUser], pool: LoadPool,
            duration: float) -> dict[str, Any]:
    context: ssl.SSLContext = client_context(endpoint.ca_file)
    creds = tuple(Credentials("login", u.name, u.password) for u in users)
    for cred in creds:
        for _ in range(WARM_UP_LOGINS):
            client, _ = imap_login(endpoint, context, cred)
            client.logout()
    single = pool.run(login_loop, LoadSpec(endpoint, creds, 1, duration=min(duration, 4.0)))
    load = pool.run(login_loop, LoadSpec(endpoint, creds, CLIENTS, duration=duration))
    if not load.logins or not single.logins:
        raise RuntimeError(f"no login succeeded: {dict(load.errors) or dict(single.errors)}")
    return {"logins_per_s": load.logins / load.elapsed, "failures": load.failures,
            "p50_ms": median(load.latencies) * 1000,
            "single_client_p50_ms": median(single.latencies) * 1000,
            "errors": dict(load.errors)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measure every setup this many times, interleaved (best kept)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    users = [GatewayUser(f"mg-login-{i}", secrets.token_urlsafe(12),
                         upstream_name(f"login-{i}")) for i in range(LOGIN_USERS)]
    setups: dict[str, Callable[..., Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    work = Path(tempfile.mkdtemp(prefix="mailgate-scale-"))
    try:
        with LabProcess() as lab, LoadPool() as pool:
            info = lab.info
            assert info is not None
            postgres = LabPostgres()
            postgres.start()
            try:
                setups = {
                    "workers=1": lambda d: gateways(d, lab, info, users),
                    "workers=2": lambda d: gateways(d, lab, info, users, workers=2),
                    "pg, 1 instance direct": lambda d: gateways(
                        d, lab, info, users, store_url=postgres.new_database()),
                    "pg, 2 instances via HAProxy": lambda d: gateways(
                        d, lab, info, users, instances=2, store_url=postgres.new_database(),
                        haproxy=True),
                }
                for round_ in range(args.rounds):
                    for name, setup in setups.items():
                        directory = work / f"{round_}-{len(runs.get(name, []))}-{name[:9]}"
                        with setup(directory) as endpoint:
                            result = measure(endpoint, users, pool, args.duration)
                        runs.setdefault(name, []).append(result)
                        print(f"{name:32} {result['logins_per_s']:7.1f} logins/s  "
                              f"p50 {result['p50_ms']:6.1f} ms  single client p50 "
                              f"{result['single_client_p50_ms']:5.1f} ms  "
                              f"failures {result['failures']}", flush=True)
            finally:
                postgres.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {name: max(results, key=lambda r: r["logins_per_s"]) for name, results in runs.items()}
    summary = {
        "workers_ratio": best["workers=2"]["logins_per_s"] / best["workers=1"]["logins_per_s"],
        "haproxy_ratio": (best["pg, 2 instances via HAProxy"]["logins_per_s"]
                          / best["pg, 1 instance direct"]["logins_per_s"]),
        "haproxy_added_latency_ms": (best["pg, 2 instances via HAProxy"]["single_client_p50_ms"]
                                     - best["pg, 1 instance direct"]["single_client_p50_ms"]),
    }
    print(f"workers=2 / workers=1: {summary['workers_ratio']:.2f}x (target >= 1.6)")
    print(f"2 instances via HAProxy / 1 direct: {summary['haproxy_ratio']:.2f}x; "
          f"HAProxy hop adds {summary['haproxy_added_latency_ms']:+.1f} ms to a login")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"runs": runs, "best": best, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
