"""Concurrent IMAP login load, spread over worker processes.

Theory of operation
-------------------
One Python process cannot drive 500 TLS handshakes at once without becoming the bottleneck
itself, so the load is split over :data:`WORKER_PROCESSES` worker processes (``spawn``), each
running its share of clients as threads with blocking sockets (the TLS handshake and socket
waits release the interpreter lock). Every worker starts its clients at the same wall-clock
instant ``start_at`` (set a little in the future, so process start-up is not measured), and
returns plain numbers that :func:`merge` adds up.

* :func:`login_loop` -- each client logs in, logs out, and again, until ``start_at + duration``:
  logins per second under sustained concurrency (figure 2).
* :func:`burst` -- each client connects and logs in once at ``start_at``; every session stays
  open until all clients of the worker are done, then logs out: a thundering herd (figure 3).

The same functions drive the baseline (direct XOAUTH2 to Dovecot) and mailgate (LOGIN), so the
two are measured the same way.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from bench.wire import Credentials, Endpoint, IMAPClient, client_context, imap_login

__all__ = ["LoadSpec", "LoadResult", "LoadPool", "login_loop", "burst", "merge"]

#: Worker processes that run the client threads (one per core of the issue's 2-core machine).
WORKER_PROCESSES = 2
#: How far in the future the clients start, so worker start-up is not part of the measurement.
START_DELAY = 1.0
#: How long a burst worker waits for all its clients before giving up on the stragglers.
BURST_TIMEOUT = 120.0
#: Distinct error messages kept per result.
MAX_ERROR_KINDS = 5


@dataclass(frozen=True)
class LoadSpec:
    endpoint: Endpoint
    credentials: tuple[Credentials, ...]  # client i logs in with credentials[i % len]
    clients: int
    start_at: float = 0.0  # time.time() at which every client starts
    duration: float = 0.0  # login_loop only


@dataclass
class LoadResult:
    logins: int = 0
    failures: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, connect -> tagged OK
    elapsed: float = 0.0  # start_at -> last client done (burst) or the loop's duration
    errors: Counter[str] = field(default_factory=Counter)


def merge(results: list[LoadResult]) -> LoadResult:
    total = LoadResult()
    for r in results:
        total.logins += r.logins
        total.failures += r.failures
        total.latencies.extend(r.latencies)
        total.elapsed = max(total.elapsed, r.elapsed)
        total.errors.update(r.errors)
    return total


def _record_error(result: LoadResult, lock: threading.Lock, exc: BaseException) -> None:
    kind = f"{type(exc).__name__}: {exc}"[:160]
    with lock:
        result.failures += 1
        if kind in result.errors or len(result.errors) < MAX_ERROR_KINDS:
            result.errors[kind] += 1


def _sleep_until(start_at: float) -> None:
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)


def login_loop(spec: LoadSpec) -> LoadResult:
    """Each client: login, LOGOUT, repeat until the duration is over."""
    context = client_context(spec.endpoint.ca_file)
    result = LoadResult(elapsed=spec.duration)
    lock = threading.Lock()
    end_at = spec.start_at + spec.duration

    def client(i: int) -> None:
        credentials = spec.credentials[i % len(spec.credentials)]
        _sleep_until(spec.start_at)
        while time.time() < end_at:
            try:
                session, seconds = imap_login(spec.endpoint, context, credentials)
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                _record_error(result, lock, exc)
                continue
            session.logout()
            with lock:
                result.logins += 1
                result.latencies.append(seconds)

    _run_threads(client, spec.clients)
    return result


def burst(spec: LoadSpec) -> LoadResult:
    """Every client connects and logs in at ``start_at``; sessions are held until all are
    done, then logged out."""
    context = client_context(spec.endpoint.ca_file)
    result = LoadResult()
    lock = threading.Lock()
    all_done = threading.Barrier(spec.clients)
    finished_at: list[float] = []

    def client(i: int) -> None:
        credentials = spec.credentials[i % len(spec.credentials)]
        session: IMAPClient | None = None
        _sleep_until(spec.start_at)
        try:
            session, seconds = imap_login(spec.endpoint, context, credentials)
            with lock:
                result.logins += 1
                result.latencies.append(seconds)
        except Exception as exc:  # noqa: BLE001 - every failure is counted
            _record_error(result, lock, exc)
        with lock:
            finished_at.append(time.time())
        try:
            all_done.wait(timeout=BURST_TIMEOUT)
        except threading.BrokenBarrierError:
            pass
        if session is not None:
            session.logout()

    _run_threads(client, spec.clients)
    result.elapsed = max(finished_at, default=spec.start_at) - spec.start_at
    return result


def _run_threads(target, count: int) -> None:  # type: ignore[no-untyped-def]
    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class LoadPool:
    """The worker processes, started once and reused by every load figure."""

    def __init__(self, workers: int = WORKER_PROCESSES) -> None:
        self.workers = workers
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        # Start every worker now (spawn + imports), not inside a measurement.
        list(self._pool.map(_wait_briefly, range(workers)))

    def run(self, fn, spec: LoadSpec) -> LoadResult:  # type: ignore[no-untyped-def]
        """Split ``spec.clients`` over the workers, start them together, merge the results."""
        start_at = time.time() + START_DELAY
        shares = [spec.clients // self.workers + (1 if i < spec.clients % self.workers else 0)
                  for i in range(self.workers)]
        specs = []
        offset = 0
        for share in shares:
            if share == 0:
                continue
            creds = tuple(spec.credentials[(offset + k) % len(spec.credentials)]
                          for k in range(min(share, len(spec.credentials))))
            specs.append(LoadSpec(spec.endpoint, creds, share, start_at, spec.duration))
            offset += share
        return merge(list(self._pool.map(fn, specs)))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> LoadPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _wait_briefly(_: int) -> bool:
    time.sleep(0.2)  # keep this worker busy so the next task goes to another one
    return True
