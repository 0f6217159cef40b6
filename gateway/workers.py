"""``[server] workers = N``: N gateway processes on one machine, one supervisor.

Theory of operation
-------------------
One Python process runs on one core. :func:`run_workers` (``mailgate serve`` with more than
one worker) is a small supervisor that does no mail work itself. Rules:

1. **Before forking**, in the supervisor: the TLS certificate is created if missing (so N
   workers do not race to create one), and every listener on port 0 gets a concrete port
   (:func:`gateway.listeners.reserve`; the reservation stays open while workers run).
2. **Workers** are forked children; each runs the ordinary single-process gateway
   (:func:`gateway.app.serve`) with its own listening sockets on the same addresses
   (``SO_REUSEPORT``: the kernel spreads connections) and the same ``state_dir``. Only worker
   0 serves the admin port; the others report their figures to it
   (:mod:`gateway.admin.worker_reports`). Each applies :func:`gateway.config.per_worker`:
   the caps that must hold for the whole gateway are divided among the workers.
3. **What is shared through state_dir**: the credential store (SQLite serialises writers),
   the token-refresh lock (one ``flock`` per account: one refresh at a time across workers,
   and the refreshed access token sealed into the store for the others,
   :mod:`gateway.oauth.shared_token`) and the POP3 maildrop lock (an ``flock``: exclusive
   across workers, released by the kernel when its holder dies, ``kill -9`` included).
4. **Signals**: SIGTERM/SIGINT and SIGHUP sent to the supervisor are forwarded to every
   worker (each drains, or reloads, exactly as a single process does). The supervisor exits
   when every worker has, with the first non-zero status if any.
5. **A worker that dies** otherwise (a crash, ``kill -9``) is started again after
   :data:`RESTART_DELAY`; its connections are gone, the other workers are untouched.

The supervisor waits with ``sigwait`` on blocked signals: no signal handler runs Python code
between forks, and children unblock them before starting trio.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from functools import partial
from pathlib import Path

import trio

from .app import serve
from .certs import ensure_certificate
from .config import Config
from .listeners import reserve

log = logging.getLogger("mailgate.workers")

__all__ = ["run_workers"]

RESTART_DELAY = 1.0  # seconds before a worker that died is started again
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


def _concrete_ports(config: Config) -> tuple[Config, list[socket.socket]]:
    """Rule 1: listeners on port 0 get a reserved concrete port."""
    reserved: list[socket.socket] = []
    listeners = []
    for lst in config.listeners:
        if lst.port == 0:
            sock = reserve(lst.host)
            reserved.append(sock)
            port = sock.getsockname()[1]
            host = f"[{lst.host}]" if ":" in lst.host else lst.host
            lst = lst.model_copy(update={"bind": f"{host}:{port}"})
        listeners.append(lst)
    return config.model_copy(update={"listeners": listeners}), reserved


def _child(config: Config, config_path: Path, worker: int) -> None:
    """In a forked worker: run the gateway, never return."""
    code = 1
    try:
        # Until the gateway listens for signals, a reload request must not end the worker
        # (SIGHUP's default action); SIGTERM/SIGINT may.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        code = trio.run(partial(serve, config, config_path, worker=worker))
    except BaseException as exc:  # a worker must end here, whatever happened
        log.error("worker %d failed: %s: %s", worker, type(exc).__name__, exc)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_workers(config: Config, config_path: Path) -> int:
    count = config.server.worker_count
    if any(lst.tls != "none" for lst in config.listeners):
        ensure_certificate(config.tls.cert_file, config.tls.key_file, config.server.hostname)
    config, reserved = _concrete_ports(config)
    for lst in config.listeners:
        log.info("listening on %s (%s, tls=%s) with %d workers", lst.bind, lst.protocol,
                 lst.tls, count)
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    children: dict[int, int] = {}  # pid → worker number

    def start(worker: int) -> None:
        pid = os.fork()
        if pid == 0:
            _child(config, config_path, worker)
        children[pid] = worker
        log.info("worker %d started (pid %d)", worker, pid)

    for worker in range(count):
        start(worker)
    stopping, status = False, 0
    try:
        while children:
            signum = signal.sigwait(SIGNALS)
            if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                stopping = stopping or signum != signal.SIGHUP
                forward = signal.SIGTERM if signum == signal.SIGINT else signum
                for pid in children:
                    os.kill(pid, forward)
            while children:  # reap every worker that ended
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                worker = children.pop(pid)
                code = os.waitstatus_to_exitcode(wait_status)
                status = status or (code if code > 0 else 0)
                if stopping:
                    log.info("worker %d (pid %d) ended", worker, pid)
                    continue
                log.error("worker %d (pid %d) died (%s); starting it again", worker, pid,
                          f"signal {-code}" if code < 0 else f"status {code}")
                time.sleep(RESTART_DELAY)
                start(worker)
    finally:
        for sock in reserved:
            sock.close()
    return status
