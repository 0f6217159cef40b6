"""``python -m bench``: start the lab and mailgate, measure every figure, print and save the table.

Theory of operation
-------------------
1. The lab (Dovecot + OAuth server) starts in its own process (:mod:`bench.labproc`).
2. The mailboxes the selected figures need are seeded (big messages, 10,000 small ones).
3. mailgate is configured against the lab, its accounts are authorized through its CLI, and
   it starts as a separate process (:mod:`bench.gateway_proc`); a front end that does not
   import gets no listener and its figures say ``n/a``. The peers the selected figures
   compare with start likewise (:mod:`bench.peers`), each column ``n/a`` if its peer cannot.
4. Every mailgate account logs in once (so "token cached" holds), then the figures run in
   order (:mod:`bench.figures`); a figure that fails outright becomes an ``n/a`` row. After
   each figure its peers are measured and attached (:mod:`bench.peer_figures`).
5. The table goes to stdout, the JSON to ``bench/results/latest.json``; progress to stderr.

Everything started is stopped on every path (context managers); the work directory (config,
state, certificates, mailgate's log) is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench import seeding
from bench.figures import (
    BIG_TRANSFER,
    FIGURES,
    HUGE_TRANSFER,
    MAILBOXES_FOR,
    BenchEnv,
    NoTarget,
    Settings,
    gateway_users,
    machine_description,
    reason,
    upstream_name,
)
from bench.gateway_proc import (
    GatewayProcess,
    authorize_users,
    free_port,
    missing_frontends,
    write_config,
)
from bench.labproc import LabInfo, LabProcess
from bench.load import LoadPool
from bench.peer_figures import PEER_TWINS, peer_users, warm_up_peers, with_peers
from bench.peers import ACCESS_TOKEN_LIFETIME, Peers, start_peers
from bench.profiler import Profiler, format_hotspots, py_spy_path
from bench.stats import Figure, Measurement, format_table, to_json
from bench import smtp_bench

smtp_bench.register(FIGURES, MAILBOXES_FOR)  # type: ignore[arg-type]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "latest.json"
#: Mailboxes seeded at once (each seeding is one IMAPS session to the lab).
SEED_PARALLEL = 4
#: Size range of the POP3 figure's small messages (varied, deterministic).
POP_MESSAGE_MIN = 1024
POP_MESSAGE_SPREAD = 2048

_started = time.monotonic()


def progress(text: str) -> None:
    print(f"[{time.monotonic() - _started:6.1f}s] {text}", file=sys.stderr, flush=True)


def parse_only(text: str | None) -> list[int]:
    """``"1,5,7"`` -> ``[1, 5, 7]``; ``None`` -> every figure. Raises ValueError."""
    if not text:
        return sorted(FIGURES)
    chosen = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) not in FIGURES:
            raise ValueError(f"no figure {part!r} (figures are {min(FIGURES)}..{max(FIGURES)})")
        chosen.add(int(part))
    return sorted(chosen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure mailgate against a real Dovecot baseline (see bench/README.md).",
    )
    parser.add_argument("--only", metavar="N,N", help="run only these figures, e.g. 1,5")
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples and sessions (a smoke run, ~1 minute)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help=f"where to write the results (default {DEFAULT_JSON})")
    parser.add_argument("--profile", nargs="?", const="wall", choices=["wall", "gil"],
                        help="sample mailgate with py-spy during each figure and print where "
                             "its time went; 'gil': only samples running Python code "
                             "(profiled figures are slower: not for the docs)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (mailgate config, state, log)")
    return parser


def _pop_messages(count: int) -> Iterator[bytes]:
    for n in range(count):
        yield seeding.small_message(n, POP_MESSAGE_MIN + (n * 37) % POP_MESSAGE_SPREAD)


def seed(info: LabInfo, groups: set[str], settings: Settings) -> None:
    jobs = []
    if "small" in groups:
        jobs.append(lambda: seeding.bulk_append(info, upstream_name("small"),
                                                iter([seeding.small_message(0)])))
    if "big20" in groups:
        jobs.append(lambda: seeding.append_big(info, upstream_name("big20"), BIG_TRANSFER))
    if "big50" in groups:
        jobs.append(lambda: seeding.append_big(info, upstream_name("big50"), HUGE_TRANSFER))
    if "pop" in groups:
        for twin in ("pop-direct", "pop-gw", *PEER_TWINS):
            jobs.append(lambda twin=twin: seeding.bulk_append(
                info, upstream_name(twin), _pop_messages(settings.pop_messages)))
    with ThreadPoolExecutor(SEED_PARALLEL) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def _load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def dovecot_version() -> str:
    try:
        done = subprocess.run(["dovecot", "--version"], capture_output=True, text=True,
                              timeout=10)
        return done.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def _profiling(pid: int, output: Path, mode: str, title: str) -> Iterator[None]:
    py_spy = py_spy_path()
    if py_spy is None:
        yield
        return
    profiler = Profiler(pid, output, py_spy, gil_only=mode == "gil")
    with profiler:
        yield
    print(format_hotspots(f"{title} ({output})", profiler.text()), file=sys.stderr, flush=True)


def _window_profiler(pid: int, directory: Path, mode: str):  # type: ignore[no-untyped-def]
    def window(name: str):  # type: ignore[no-untyped-def]
        return _profiling(pid, directory / f"profile-window{name}-{mode}.txt", mode,
                          f"window {name}")
    return window


def profiled(number: int, env: BenchEnv, directory: Path, mode: str) -> list[Figure]:
    """Run one figure with py-spy attached to mailgate; print the hot spots."""
    if py_spy_path() is None or env.gateway is None:
        progress("--profile: " + ("mailgate is not running" if env.gateway is None else
                                  "py-spy is not installed (pip install -e '.[bench]')"))
        return run_figure(number, env)
    with _profiling(env.gateway.pid, directory / f"profile-figure{number}-{mode}.txt", mode,
                    f"figure {number}"):
        return run_figure(number, env)


def run_figure(number: int, env: BenchEnv) -> list[Figure]:
    try:
        return FIGURES[number](env)
    except Exception as exc:  # noqa: BLE001 - one broken figure must not lose the others
        title = (FIGURES[number].__doc__ or FIGURES[number].__name__).strip().splitlines()[0]
        missing = Measurement.missing(reason(exc))
        return [Figure(str(number), title, "-", missing, missing, NoTarget())]


def start_and_warm_peers(stack: ExitStack, workdir: Path, lab: LabProcess, selected: list[int],
                         python: str) -> Peers:
    """Start the peers the selected figures compare with (bench/peers.py); one that cannot
    start is reported and its columns say n/a."""
    users = peer_users(selected)
    if not users:
        return Peers()
    assert lab.info is not None
    progress(f"starting the peers: {', '.join(sorted(users))}")
    peers = start_peers(workdir / "peers", lab.info, users, lab.issue_tokens,
                        ACCESS_TOKEN_LIFETIME, python)
    stack.callback(peers.stop)
    for peer, why in peers.unavailable.items():
        progress(f"peer {peer}: n/a ({why})")
    for user, problem in warm_up_peers(peers).items():
        progress(f"warm-up login of {user} through emailproxy failed: {problem}")
    return peers


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        selected = parse_only(args.only)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    settings = Settings.quick_mode() if args.quick else Settings.full()
    load_before = os.getloadavg()
    python = sys.executable
    workdir = Path(tempfile.mkdtemp(prefix="mailgate-bench-"))
    groups = set().union(*(MAILBOXES_FOR[n] for n in selected))
    figures: list[Figure] = []
    with ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, True)
        progress("starting the lab (Dovecot + OAuth server)")
        lab = stack.enter_context(LabProcess(python, ROOT))
        assert lab.info is not None
        info = lab.info
        pool = stack.enter_context(LoadPool())
        progress(f"seeding mailboxes: {', '.join(sorted(groups))}")
        seed(info, groups, settings)
        users = gateway_users(groups)
        unavailable = missing_frontends(python, ROOT)
        for protocol, why in unavailable.items():
            progress(f"mailgate {protocol}: n/a ({why})")
        ports = {p: free_port() for p in ("imap", "pop3", "smtp") if p not in unavailable}
        gateway: GatewayProcess | None = None
        if ports:
            config = write_config(workdir, info, users, ports)
            progress(f"authorizing {len(users)} mailgate accounts (mailgate authorize)")
            try:
                authorize_users(python, ROOT, config, users,
                                lambda upstream: lab.issue_tokens(upstream)[1])
                progress("starting mailgate (python -m gateway serve)")
                gateway = stack.enter_context(
                    GatewayProcess(python, ROOT, config, ports.values()))
            except Exception as exc:  # noqa: BLE001 - baselines are still worth measuring
                unavailable["*"] = reason(exc)
                progress(f"mailgate not running: {reason(exc)}")
        else:
            unavailable["*"] = "no front end imports"
        env = BenchEnv(lab, info, settings, {u.name: u for u in users}, gateway, unavailable,
                       pool, gateway_ports=ports)
        if gateway is not None:
            for name, problem in env.warm_up().items():
                progress(f"warm-up login of {name} through mailgate failed: {problem}")
            if args.profile:
                env.profile_window = _window_profiler(gateway.pid, args.json.parent,
                                                      args.profile)
        peers = start_and_warm_peers(stack, workdir, lab, selected, python)
        for number in selected:
            progress(f"figure {number}: {FIGURES[number].__name__}")
            if args.profile:
                rows = profiled(number, env, args.json.parent, args.profile)
            else:
                rows = run_figure(number, env)
            figures += with_peers(number, rows, env, peers)
        if args.keep:
            progress(f"work directory kept: {workdir}")
        progress("stopping mailgate, the load workers and the lab")
    load_after = os.getloadavg()
    table = format_table(figures)
    print(table)
    print(f"load average (1/5/15 min) before: {_load(load_before)}, after: {_load(load_after)}"
          f" on {os.cpu_count()} cores (anything above the benchmark's own share is a "
          "neighbour: compare ratios, not absolute numbers)")
    document = to_json(figures, machine_description(dovecot_version()), {
        **vars(settings), "only": selected, "seconds": round(time.monotonic() - _started, 1),
        "loadavg_before": load_before, "loadavg_after": load_after,
    })
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    progress(f"done; results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
