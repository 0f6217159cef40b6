"""``python -m bench.profile_paths``: CPU cost of mailgate's hot paths, optionally under cProfile.

Theory of operation
-------------------
A focused companion of ``python -m bench`` for A/B work on the code: it starts the lab
(:mod:`bench.labproc`), seeds one 20 MB message, authorizes two accounts and starts mailgate
as a separate process (optionally as ``python -m cProfile -o FILE -m gateway ... serve``), then
measures **mailgate's CPU time** (``utime + stime`` from ``/proc``, :mod:`bench.procstat`)

* per IMAP login: ``LOGINS`` sequential connect → TLS → LOGIN → LOGOUT through mailgate
  (token and password cached by a warm-up login), and
* per 20 MB ``UID FETCH BODY.PEEK[]``: ``FETCHES`` transfers in one session.

CPU time, not wall time, because the machine is shared and loaded: a change that saves work
shows up here even when the scheduler hides it in wall time. With ``--profile FILE`` the
cProfile statistics (written when mailgate exits on SIGTERM) are printed sorted by own time.
"""

from __future__ import annotations

import argparse
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench import seeding
from bench.figures import BIG_TRANSFER, upstream_name
from bench.gateway_proc import GatewayProcess, GatewayUser, authorize_users, free_port, write_config
from bench.labproc import LabProcess
from bench.procstat import cpu_seconds
from bench.wire import Credentials, Endpoint, client_context, imap_login

ROOT = Path(__file__).resolve().parent.parent
#: Sequential logins measured (after one warm-up login).
LOGINS = 200
#: 20 MB transfers measured (after one warm-up transfer).
FETCHES = 5
#: mailgate under cProfile with a CPU-time clock (wall time on a loaded machine is mostly
#: waiting for a core); argv: stats file, then ``-m gateway ...``.
CPU_PROFILER = (
    "import cProfile, runpy, sys, time\n"
    "out = sys.argv[1]; sys.argv = sys.argv[3:]\n"
    "p = cProfile.Profile(time.process_time)\n"
    "try:\n"
    "    p.runcall(runpy.run_module, 'gateway', run_name='__main__', alter_sys=True)\n"
    "except SystemExit:\n"
    "    pass\n"
    "finally:\n"
    "    p.dump_stats(out)\n"
)
#: Lines of the cProfile summary printed.
PROFILE_LINES = 35


class ProfiledGateway(GatewayProcess):
    """mailgate under cProfile: the statistics are written to ``profile`` when it exits."""

    def __init__(self, *args: object, profile: Path | None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.profile = profile

    def start(self) -> GatewayProcess:
        if self.profile is None:
            return super().start()
        real_popen = subprocess.Popen

        def popen(cmd: list[str], **kw: object) -> subprocess.Popen[bytes]:
            cmd = [cmd[0], "-c", CPU_PROFILER, str(self.profile), *cmd[1:]]
            return real_popen(cmd, **kw)  # type: ignore[call-overload, no-any-return]

        subprocess.Popen = popen  # type: ignore[assignment, misc]
        try:
            return super().start()
        finally:
            subprocess.Popen = real_popen  # type: ignore[misc]


def measure_logins(gateway: GatewayProcess, endpoint: object, context: object,
                   credentials: Credentials, count: int) -> float:
    """mailgate CPU milliseconds per login (connect, TLS, LOGIN, LOGOUT)."""
    imap_login(endpoint, context, credentials)[0].logout()  # type: ignore[arg-type]
    before = cpu_seconds(gateway.pid)
    for _ in range(count):
        imap_login(endpoint, context, credentials)[0].logout()  # type: ignore[arg-type]
    return (cpu_seconds(gateway.pid) - before) * 1000 / count


def measure_fetches(gateway: GatewayProcess, endpoint: object, context: object,
                    credentials: Credentials, count: int) -> tuple[float, float]:
    """(mailgate CPU ms per 20 MB FETCH, MB/s) in one session."""
    session, _ = imap_login(endpoint, context, credentials)  # type: ignore[arg-type]
    session.select()
    session.fetch_body(1)
    before, started = cpu_seconds(gateway.pid), time.monotonic()
    size = 0
    for _ in range(count):
        size += session.fetch_body(1)
    wall = time.monotonic() - started
    cpu = (cpu_seconds(gateway.pid) - before) * 1000 / count
    session.logout()
    return cpu, size / wall / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_paths")
    parser.add_argument("--logins", type=int, default=LOGINS)
    parser.add_argument("--fetches", type=int, default=FETCHES)
    parser.add_argument("--profile", type=Path, help="run mailgate under cProfile, stats here")
    args = parser.parse_args(argv)
    python = sys.executable
    workdir = Path(tempfile.mkdtemp(prefix="mailgate-profile-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        lab = stack.enter_context(LabProcess(python, ROOT))
        assert lab.info is not None
        info = lab.info
        if args.fetches:
            seeding.append_big(info, upstream_name("big20"), BIG_TRANSFER)
        users = [GatewayUser("mg-login", "pw-login-1234", upstream_name("login-0")),
                 GatewayUser("mg-big20", "pw-big20-1234", upstream_name("big20"))]
        ports = {"imap": free_port(), "pop3": free_port()}
        config = write_config(workdir, info, users, ports)
        authorize_users(python, ROOT, config, users, lambda up: lab.issue_tokens(up)[1])
        gateway = ProfiledGateway(python, ROOT, config, ports.values(), profile=args.profile)
        with gateway:
            endpoint = Endpoint("127.0.0.1", ports["imap"], gateway.ca_file)
            context = client_context(gateway.ca_file)
            login = Credentials("login", "mg-login", "pw-login-1234")
            if args.logins:
                per_login = measure_logins(gateway, endpoint, context, login, args.logins)
                print(f"logins: {args.logins}, mailgate CPU {per_login:.2f} ms per login")
            if args.fetches:
                big = Credentials("login", "mg-big20", "pw-big20-1234")
                cpu, rate = measure_fetches(gateway, endpoint, context, big, args.fetches)
                print(f"20 MB FETCH x{args.fetches}: mailgate CPU {cpu:.0f} ms per 20 MB, "
                      f"{rate:.1f} MB/s")
    if args.profile is not None and args.profile.exists():
        stats = pstats.Stats(str(args.profile))
        stats.sort_stats("tottime").print_stats(PROFILE_LINES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
