"""``python -m bench.ab OLD_TREE``: two mailgate versions side by side, samples interleaved.

Theory of operation
-------------------
On a shared, loaded machine a change to the hot path is only visible in an A/B run: one lab
(Dovecot + OAuth server), two mailgate processes configured alike against it -- ``A`` runs the
code in ``OLD_TREE`` (e.g. ``git archive main | tar -x -C /tmp/old``), ``B`` the code of this
checkout -- and every sample round-robins over direct Dovecot, A and B, so a busy neighbour
slows all three alike. Measured: the small FETCH round trip (figure 4's), the 20 MB FETCH
(figure 5's) and the 20 MB RETR (figure 6's, with Dovecot's own POP3S as the direct column).
Times are printed as min / median / p99 with the load average before and after.

``--profile`` attaches py-spy (``--py-spy PATH``) to B during its small round trips only
(A and direct keep running, interleaved, so the machine's state is the same).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from statistics import median

from bench import procstat, seeding
from bench.figures import BIG_TRANSFER, upstream_name
from bench.gateway_proc import GatewayProcess, GatewayUser, authorize_users, free_port, write_config
from bench.labproc import LabProcess
from bench.stats import percentile
from bench.wire import Credentials, Endpoint, IMAPClient, POP3Client, client_context, imap_login

ROOT = Path(__file__).resolve().parent.parent


def _start(python: str, tree: Path, workdir: Path, lab: LabProcess, users: list[GatewayUser]
           ) -> tuple[GatewayProcess, dict[str, int]]:
    assert lab.info is not None
    ports = {"imap": free_port(), "pop3": free_port()}
    config = write_config(workdir, lab.info, users, ports)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tree)
    try:
        authorize_users(python, tree, config, users,
                        lambda upstream: lab.issue_tokens(upstream)[1])
        gateway = GatewayProcess(python, tree, config, ports.values()).start()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return gateway, ports


def _stats(ms: list[float]) -> str:
    return (f"min {min(ms):7.3f}  median {median(ms):7.3f}  p99 {percentile(ms, 99):7.3f}"
            f"  (n={len(ms)})")


def _round_robin(rounds: int, runners: dict[str, Callable[[], float]],
                 warm_up: int = 20) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(rounds + warm_up):
        for name, run in runners.items():
            value = run()
            if i >= warm_up:
                samples[name].append(value)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab")
    parser.add_argument("old_tree", type=Path, help="checkout of the A (old) version")
    parser.add_argument("--rounds", type=int, default=1000, help="small FETCH round trips")
    parser.add_argument("--transfers", type=int, default=7, help="20 MB transfers per side")
    parser.add_argument("--idle", type=int, default=300, help="idle sessions per side")
    parser.add_argument("--only", default="small,fetch,retr",
                        help="comma-separated: small, fetch, retr, idle (idle best alone: "
                             "memory freed by the others hides part of its cost)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--py-spy", default="py-spy")
    parser.add_argument("--attach", metavar="CMD",
                        help="instead of py-spy: a command attached to B during the small round "
                             "trips, {pid} and {out} replaced (e.g. 'strace -c -p {pid} -o {out}')")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    python = sys.executable
    load_before = os.getloadavg()
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="mailgate-ab-"))
        stack.callback(shutil.rmtree, workdir, True)
        lab = stack.enter_context(LabProcess(python, ROOT))
        info = lab.info
        assert info is not None
        seeding.bulk_append(info, upstream_name("small"), iter([seeding.small_message(0)]))
        if only & {"fetch", "retr"}:
            seeding.append_big(info, upstream_name("big20"), BIG_TRANSFER)
        users = [GatewayUser("mg-small", "pw-small-1234", upstream_name("small")),
                 GatewayUser("mg-big20", "pw-big20-1234", upstream_name("big20"))]
        gateways = {}
        for name, tree in (("A", args.old_tree.resolve()), ("B", ROOT)):
            gateway, ports = _start(python, tree, workdir / name, lab, users)
            stack.callback(gateway.stop)
            gateways[name] = (gateway, ports)
        lab_ctx = client_context(info.ca_file)
        direct_imaps = Endpoint(info.host, info.ports["imaps"], info.ca_file)
        direct_pop3s = Endpoint(info.host, info.ports["pop3s"], info.ca_file)
        token = {u: lab.issue_tokens(u)[0] for u in (upstream_name("small"),
                                                      upstream_name("big20"))}

        def imap(side: str, user: GatewayUser) -> IMAPClient:
            if side == "direct":
                client, _ = imap_login(direct_imaps, lab_ctx,
                                       Credentials("xoauth2", user.upstream_user,
                                                   token[user.upstream_user]))
            else:
                gateway, ports = gateways[side]
                client, _ = imap_login(Endpoint("127.0.0.1", ports["imap"], gateway.ca_file),
                                       client_context(gateway.ca_file),
                                       Credentials("login", user.name, user.password))
            client.select()
            return client

        def pop3(side: str, user: GatewayUser) -> POP3Client:
            if side == "direct":
                client = POP3Client.connect(direct_pop3s, lab_ctx)
                client.login(Credentials("login", user.upstream_user, info.password))
            else:
                gateway, ports = gateways[side]
                client = POP3Client.connect(Endpoint("127.0.0.1", ports["pop3"],
                                                     gateway.ca_file),
                                            client_context(gateway.ca_file))
                client.login(Credentials("login", user.name, user.password))
            return client

        sides = ("direct", "A", "B")
        profiler = None
        out = workdir.parent / "ab-profile.txt"
        pid = str(gateways["B"][0].pid)
        if args.attach:
            profiler = subprocess.Popen(
                [w.replace("{pid}", pid).replace("{out}", str(out))
                 for w in args.attach.split()],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        elif args.profile:
            profiler = subprocess.Popen(
                [args.py_spy, "record", "--nonblocking", "--gil", "--format", "raw", "--rate",
                 "1000", "-o", str(out), "--pid", pid],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        if "small" in only:
            sessions = {s: imap(s, users[0]) for s in sides}

            def fetch_once(session: IMAPClient) -> Callable[[], float]:
                def run() -> float:
                    start = time.perf_counter()
                    session.fetch_body(1)
                    return (time.perf_counter() - start) * 1000
                return run

            runners = {s: fetch_once(sessions[s]) for s in sides}
            cpu_before = {s: procstat.cpu_times(gateways[s][0].pid) for s in ("A", "B")}
            samples = _round_robin(args.rounds, runners)
            cpu = {}
            for s, (user0, sys0) in cpu_before.items():
                user1, sys1 = procstat.cpu_times(gateways[s][0].pid)
                cpu[s] = ((user1 - user0) * 1000 / (args.rounds + 20),
                          (sys1 - sys0) * 1000 / (args.rounds + 20))
            print("small FETCH round trip, ms")
            for s in sides:
                used = (f"  mailgate CPU/round trip: user {cpu[s][0]:.3f} + system "
                        f"{cpu[s][1]:.3f} ms" if s in cpu else "")
                print(f"  {s:6s} {_stats(samples[s])}{used}")
            for s in sessions.values():
                s.logout()
        if "idle" in only:
            # Idle IMAP sessions (LOGIN, SELECT, IDLE) opened alternately on A and B: RSS
            # growth per session (figure 8's measure, both versions in one run).
            rss_before = {s: procstat.rss_kib(gateways[s][0].pid) for s in ("A", "B")}
            idle: dict[str, list[IMAPClient]] = {"A": [], "B": []}
            for _ in range(args.idle):
                for s in ("A", "B"):
                    client = imap(s, users[0])
                    client.idle()
                    idle[s].append(client)
            time.sleep(1.0)
            print(f"{args.idle} idle IMAP sessions per side: RSS growth per session")
            for s in ("A", "B"):
                grown = procstat.rss_kib(gateways[s][0].pid) - rss_before[s]
                print(f"  {s:6s} {grown * 1024 / 1000 / args.idle:6.1f} KB")
            for clients_ in idle.values():
                for client in clients_:
                    client.close()
        for kind in ("fetch", "retr"):
            if kind not in only:
                continue
            if kind == "fetch":
                clients = {s: imap(s, users[1]) for s in sides}

                def transfer(c: IMAPClient | POP3Client) -> Callable[[], float]:
                    def run() -> float:
                        start = time.perf_counter()
                        assert isinstance(c, IMAPClient)
                        size = c.fetch_body(1)
                        return size / (time.perf_counter() - start) / 1e6
                    return run
            else:
                clients = {s: pop3(s, users[1]) for s in sides}

                def transfer(c: IMAPClient | POP3Client) -> Callable[[], float]:
                    def run() -> float:
                        start = time.perf_counter()
                        assert isinstance(c, POP3Client)
                        size = c.multiline(b"RETR 1")
                        return size / (time.perf_counter() - start) / 1e6
                    return run
            cpu_ms: dict[str, list[float]] = {"A": [], "B": []}

            def with_cpu(side: str, run: Callable[[], float]) -> Callable[[], float]:
                if side not in cpu_ms:
                    return run
                pid = gateways[side][0].pid

                def measured() -> float:
                    before = procstat.cpu_seconds(pid)
                    rate = run()
                    cpu_ms[side].append((procstat.cpu_seconds(pid) - before) * 1000)
                    return rate
                return measured

            rates = _round_robin(args.transfers, {s: with_cpu(s, transfer(clients[s]))
                                                  for s in sides}, warm_up=1)
            print(f"20 MB {kind.upper()}, MB/s")
            for s in sides:
                r = rates[s]
                used = (f"  mailgate CPU per transfer: median {median(cpu_ms[s][1:]):.0f} ms"
                        if s in cpu_ms else "")
                print(f"  {s:6s} min {min(r):6.0f}  median {median(r):6.0f}  max {max(r):6.0f}"
                      f"  ratio to direct {median(r) / median(rates['direct']):.2f}{used}")
            for c in clients.values():
                c.close()
        if profiler is not None:
            profiler.send_signal(2)
            profiler.wait(30)
            print(f"profile of B: {out}")
    print("load average before: %.1f/%.1f/%.1f, after: %.1f/%.1f/%.1f" %
          (*load_before, *os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
