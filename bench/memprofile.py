"""``python -m bench.memprofile``: what the memory of an idle IMAP session is made of.

Theory of operation
-------------------
Figure 8 says how much an idle session costs (RSS growth per session); this says what the
bytes are. mailgate runs *in this process* (the main thread, as ``serve`` does) against the
lab, with ``tracemalloc`` on; a child process opens ``--sessions`` idle sessions (LOGIN,
SELECT, IDLE: its own TLS state is not counted) and this process then compares:

* the C heap in use (glibc ``mallinfo2``: Python objects and OpenSSL alike) before and after;
* the Python allocations (``tracemalloc`` snapshots), grouped by the line that made them.

The difference of the two is what the Python allocator does not see: OpenSSL's connection
state (two TLS connections per session). Numbers are per session. Not part of the figures:
tracemalloc's own bookkeeping inflates RSS, so only the heap and Python numbers are printed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

from bench.figures import upstream_name
from bench.gateway_proc import GatewayUser, accepts, authorize_users, free_port, write_config
from bench.labproc import LabProcess
from bench.wire import Credentials, Endpoint, client_context, imap_login

ROOT = Path(__file__).resolve().parent.parent


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_in_use() -> int:
    """Bytes of C heap in use (small blocks + mmapped ones), after a garbage collection."""
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def hold_sessions(port: int, ca: Path, name: str, password: str, count: int) -> int:
    """The child: open ``count`` idle sessions, say "open", hold them until stdin closes."""
    endpoint = Endpoint("127.0.0.1", port, ca)
    context = client_context(ca)
    held = []
    for _ in range(count):
        client, _ = imap_login(endpoint, context, Credentials("login", name, password))
        client.select()
        client.idle()
        held.append(client)
    print("open", flush=True)
    sys.stdin.read()
    for client in held:
        client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        return hold_sessions(int(argv[1]), Path(argv[2]), argv[3], argv[4], int(argv[5]))
    parser = argparse.ArgumentParser(prog="python -m bench.memprofile")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--group", default="lineno", choices=["lineno", "filename"])
    args = parser.parse_args(argv)
    import trio

    from gateway.app import serve
    from gateway.config import load_config

    workdir = Path(tempfile.mkdtemp(prefix="mailgate-mem-"))
    lab = LabProcess(sys.executable, ROOT)
    info = lab.start()
    try:
        user = GatewayUser("mg-idle", "pw-idle-1234", upstream_name("login-0"))
        port = free_port()
        config_path = write_config(workdir, info, [user], {"imap": port})
        authorize_users(sys.executable, ROOT, config_path, [user],
                        lambda upstream: lab.issue_tokens(upstream)[1])
        report: list[str] = []

        def opener(count: int) -> subprocess.Popen[str]:
            """``count`` idle sessions held by a child process (its TLS state is not ours)."""
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.memprofile", "--client", str(port),
                 str(workdir / "certs" / "mailgate-ca.pem"), user.name, user.password,
                 str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                cwd=ROOT)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "open":
                raise RuntimeError("the opener failed")
            return proc

        def clients() -> None:
            try:
                while not accepts(port):
                    time.sleep(0.1)
                warm = opener(20)  # caches, pools and first-use allocations
                time.sleep(1.0)
                heap0 = heap_in_use()
                snap0 = tracemalloc.take_snapshot()
                sessions = opener(args.sessions)
                time.sleep(1.0)
                heap1 = heap_in_use()
                snap1 = tracemalloc.take_snapshot()
                n = args.sessions
                stats = snap1.compare_to(snap0, args.group)
                python = sum(s.size_diff for s in stats)
                report.append(f"{n} idle sessions; per session: C heap "
                              f"+{(heap1 - heap0) / n / 1024:.1f} KiB, of which Python "
                              f"objects +{python / n / 1024:.1f} KiB "
                              f"(the rest: OpenSSL and other C allocations)")
                report.append("Python allocations per session, by line:")
                for stat in stats[:args.top]:
                    frame = stat.traceback[0]
                    report.append(f"  {stat.size_diff / n:8.0f} B  {stat.count_diff / n:5.1f} "
                                  f"blocks  {frame.filename}:{frame.lineno}")
                for proc in (sessions, warm):
                    proc.communicate("")
            except Exception as exc:  # noqa: BLE001 - reported, then the server is stopped
                report.append(f"failed: {type(exc).__name__}: {exc}")
            finally:
                os.kill(os.getpid(), signal.SIGTERM)

        tracemalloc.start(1)
        threading.Thread(target=clients, daemon=True).start()
        trio.run(serve, load_config(config_path), config_path)
        print("\n".join(report))
    finally:
        lab.stop()
        shutil.rmtree(workdir, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
