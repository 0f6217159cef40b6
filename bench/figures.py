"""The ten figures of the benchmark, each mailgate against a baseline measured alongside it.

Theory of operation
-------------------
:class:`BenchEnv` is what every figure needs: the lab (Dovecot + OAuth server, in its own
process), mailgate (in its own process, or the reason it is not running), the raw-socket
client endpoints, the accounts on both sides and the load workers. Each figure function takes
the env and returns one or more :class:`~bench.stats.Figure` rows; :data:`FIGURES` maps the
figure number to it.

Fairness rules every figure follows:

* Both sides are driven by the same client code (:mod:`bench.wire`, raw ``ssl`` sockets;
  :mod:`bench.load` for concurrency), so a figure compares servers, not clients.
* Sequential samples are *interleaved* (direct, mailgate, direct, mailgate, ...), so a noisy
  neighbour slows both sides alike instead of one of them.
* The baseline is Dovecot itself -- the upstream mailgate talks to -- over TLS, logging in with
  XOAUTH2 where logins are measured (every such login is introspected at the lab OAuth
  server, on both sides). Figure 10 measures a defence, not a relay: its baseline is the same
  mailgate login without the attack, measured in the same run.
* mailgate measurements run after a warm-up login per account ("token cached"); a mailgate
  part that is missing or failing yields ``n/a (reason)``, never a crash.
"""

from __future__ import annotations

import secrets
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from bench import procstat
from bench.gateway_proc import GatewayProcess, GatewayUser
from bench.labproc import LabInfo, LabProcess
from bench.load import LoadPool, LoadResult, LoadSpec, burst, login_loop
from bench.stats import (
    MEGABYTE,
    Figure,
    MaxDelta,
    MaxValue,
    Measurement,
    MinRatio,
    Target,
    median,
    megabytes_per_second,
    percentile,
)
from bench.wire import (
    Credentials,
    Endpoint,
    IMAPClient,
    POP3Client,
    client_context,
    imap_login,
)

__all__ = ["Settings", "BenchEnv", "FIGURES", "MAILBOXES_FOR", "ZeroFailures", "NoTarget"]

#: Users the login figures spread their sessions over (each user one mailbox upstream).
LOGIN_USERS = 4
#: Warm-up logins at once (each account's first login hashes its password in mailgate).
WARM_UP_PARALLEL = 4
#: Concurrent openers of the idle sessions of figure 8.
IDLE_OPEN_CONCURRENCY = 50
#: Pause after the idle sessions are open before memory is read (let buffers settle).
IDLE_SETTLE = 1.0
#: How long Dovecot may take to reap the processes of closed sessions.
REAP_TIMEOUT = 60.0
#: Sizes of the transfer messages (the issue's 20 MB and 50 MB; decimal megabytes).
BIG_TRANSFER = 20 * MEGABYTE
HUGE_TRANSFER = 50 * MEGABYTE
#: Mailgate's peak RSS growth allowed during a 50 MB transfer (the issue's 5 MB).
RSS_GROWTH_TARGET_MB = 5.0
#: Per idle session memory allowed (the issue's 60 KB) and idle CPU called "~0" (% of a core).
IDLE_SESSION_TARGET_KB = 60.0
IDLE_CPU_TARGET_PERCENT = 1.0

RAW_CLIENT = "raw ssl socket reader (bench/wire.py), in the benchmark process"
LOAD_CLIENT = ("raw ssl socket clients as threads in 2 worker processes (bench/load.py), "
               "started together")


@dataclass(frozen=True)
class Settings:
    quick: bool
    login_samples: int
    load_clients: int
    load_duration: float
    burst_clients: int
    fetch_round_trips: int
    transfer_repeats: int
    idle_sessions: int
    idle_window: float
    pop_messages: int
    pop_later_sessions: int

    @classmethod
    def full(cls) -> Settings:
        return cls(quick=False, login_samples=200, load_clients=50, load_duration=8.0,
                   burst_clients=500, fetch_round_trips=300, transfer_repeats=5,
                   idle_sessions=1000, idle_window=10.0, pop_messages=10_000,
                   pop_later_sessions=3)

    @classmethod
    def quick_mode(cls) -> Settings:
        return cls(quick=True, login_samples=40, load_clients=50, load_duration=3.0,
                   burst_clients=100, fetch_round_trips=100, transfer_repeats=3,
                   idle_sessions=200, idle_window=3.0, pop_messages=2_000,
                   pop_later_sessions=2)


@dataclass(frozen=True)
class ZeroFailures(Target):
    """No client of mailgate may fail (``extra["failures"] == 0``)."""

    @property
    def text(self) -> str:  # type: ignore[override]
        return "0 failures"

    def met(self, mailgate: Measurement, baseline: Measurement) -> bool | None:
        if not mailgate.ok:
            return None
        return mailgate.extra.get("failures") == 0


@dataclass(frozen=True)
class NoTarget(Target):
    """The issue sets no target: the figure is reported, not judged."""

    @property
    def text(self) -> str:  # type: ignore[override]
        return "(none set)"

    def met(self, mailgate: Measurement, baseline: Measurement) -> bool | None:
        return None


# ------------------------------------------------------------------------------ environment

#: Mailbox groups (upstream mailboxes and the mailgate users mapped to them) per figure.
MAILBOXES_FOR: dict[int, set[str]] = {
    1: {"login"}, 2: {"login"}, 3: {"login"}, 4: {"small"}, 5: {"big20"}, 6: {"big20"},
    7: {"big50"}, 8: {"login"}, 9: {"pop"}, 10: {"login"},
}


def upstream_name(key: str) -> str:
    return f"bench-{key}@example.com"


def gateway_users(groups: set[str]) -> list[GatewayUser]:
    """The mailgate accounts of the given mailbox groups, each with a fresh random password."""
    users = []
    if "login" in groups:
        users += [GatewayUser(f"mg-login-{i}", secrets.token_urlsafe(12),
                              upstream_name(f"login-{i}")) for i in range(LOGIN_USERS)]
    for key in ("small", "big20", "big50"):
        if key in groups:
            users.append(GatewayUser(f"mg-{key}", secrets.token_urlsafe(12), upstream_name(key)))
    if "pop" in groups:
        users.append(GatewayUser("mg-pop", secrets.token_urlsafe(12), upstream_name("pop-gw")))
    if "smtp" in groups:  # figure 12 (bench/smtp_bench.py)
        users.append(GatewayUser("mg-smtp", secrets.token_urlsafe(12), upstream_name("smtp")))
    return users


@dataclass
class BenchEnv:
    lab: LabProcess
    info: LabInfo
    settings: Settings
    users: dict[str, GatewayUser]
    gateway: GatewayProcess | None
    #: protocol -> why mailgate cannot be measured for it (missing front end, failed start)
    unavailable: dict[str, str]
    pool: LoadPool
    gateway_ports: dict[str, int] = field(default_factory=dict)
    #: With --profile: wraps a window in which only mailgate's own idle work runs (figure 8),
    #: so its profile shows what an idle mailgate does.
    profile_window: Callable[[str], AbstractContextManager[object]] | None = None
    _tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lab_context: ssl.SSLContext = client_context(self.info.ca_file)
        self.direct_imaps = Endpoint(self.info.host, self.info.ports["imaps"], self.info.ca_file)
        self.direct_pop3s = Endpoint(self.info.host, self.info.ports["pop3s"], self.info.ca_file)
        self.gateway_context: ssl.SSLContext | None = None
        if self.gateway is not None:
            self.gateway_context = client_context(self.gateway.ca_file)

    # --- credentials

    def xoauth2(self, upstream_user: str) -> Credentials:
        """Direct XOAUTH2 login to Dovecot with a (cached) lab access token."""
        if upstream_user not in self._tokens:
            self._tokens[upstream_user] = self.lab.issue_tokens(upstream_user)[0]
        return Credentials("xoauth2", upstream_user, self._tokens[upstream_user])

    def lab_password(self, upstream_user: str) -> Credentials:
        return Credentials("login", upstream_user, self.info.password)

    def gateway_login(self, name: str) -> Credentials:
        user = self.users[name]
        return Credentials("login", user.name, user.password)

    def warm_up(self, names: list[str] | None = None) -> dict[str, str]:
        """One login per mailgate account (all by default), so that its password check and
        access token are cached; returns ``{name: problem}`` for those that failed."""
        problems: dict[str, str] = {}

        def login(name: str) -> None:
            try:
                if self.why_not("imap") is None:
                    self.gateway_imap(name).logout()
                elif self.why_not("pop3") is None:
                    self.gateway_pop3(name).quit()
            except Exception as exc:  # noqa: BLE001 - the figures will say what fails
                problems[name] = reason(exc)

        with ThreadPoolExecutor(WARM_UP_PARALLEL) as pool:
            list(pool.map(login, names if names is not None else list(self.users)))
        return problems

    def restart_gateway(self, names: list[str]) -> None:
        """A fresh mailgate process (memory figures must not depend on what ran before),
        warmed up for ``names``."""
        if self.gateway is None:
            raise Unavailable(self.unavailable.get("*", "mailgate is not running"))
        self.gateway.stop()
        self.gateway.start()
        problems = self.warm_up(names)
        if problems:
            name, problem = next(iter(problems.items()))
            raise RuntimeError(f"warm-up of {name} after the restart failed: {problem}")

    # --- mailgate endpoints

    def why_not(self, protocol: str) -> str | None:
        """Why mailgate's ``protocol`` cannot be measured, or None."""
        if self.gateway is None:
            return self.unavailable.get(protocol) or self.unavailable.get("*", "not running")
        return self.unavailable.get(protocol)

    def gateway_endpoint(self, protocol: str) -> Endpoint:
        reason = self.why_not(protocol)
        if reason is not None or self.gateway is None:
            raise Unavailable(reason or "mailgate is not running")
        return Endpoint("127.0.0.1", self.gateway_ports[protocol], self.gateway.ca_file)

    @property
    def gateway_pid(self) -> int:
        if self.gateway is None:
            raise Unavailable(self.unavailable.get("*", "mailgate is not running"))
        return self.gateway.pid

    def direct_imap(self, upstream_user: str) -> IMAPClient:
        client, _ = imap_login(self.direct_imaps, self.lab_context,
                               self.xoauth2(upstream_user))
        return client

    def gateway_imap(self, name: str) -> IMAPClient:
        assert self.gateway_context is not None or self.why_not("imap")
        client, _ = imap_login(self.gateway_endpoint("imap"), self._gw_context(),
                               self.gateway_login(name))
        return client

    def direct_pop3(self, upstream_user: str) -> POP3Client:
        client = POP3Client.connect(self.direct_pop3s, self.lab_context)
        client.login(self.lab_password(upstream_user))
        return client

    def gateway_pop3(self, name: str) -> POP3Client:
        client = POP3Client.connect(self.gateway_endpoint("pop3"), self._gw_context())
        client.login(self.gateway_login(name))
        return client

    def _gw_context(self) -> ssl.SSLContext:
        if self.gateway_context is None:
            raise Unavailable("mailgate is not running")
        return self.gateway_context


class Unavailable(Exception):
    """A mailgate part cannot be measured; the message is the reason shown in the table."""


def reason(exc: BaseException) -> str:
    """What the table says about a measurement that failed."""
    if isinstance(exc, Unavailable):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc)[:140]}"


def attempt(measure: Callable[[], Measurement]) -> Measurement:
    """Run one measurement; any failure becomes ``n/a (reason)``."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 - the table says what failed, the run goes on
        return Measurement.missing(reason(exc))


def _ms(seconds: list[float]) -> list[float]:
    return [s * 1000 for s in seconds]


# ------------------------------------------------------------------------------ figure 1


def fig_login_latency(env: BenchEnv) -> list[Figure]:
    """IMAP login over TLS, connect -> tagged OK, sequential, interleaved with the baseline."""
    direct: list[float] = []
    gateway: list[float] = []
    gateway_error: str | None = env.why_not("imap")
    direct_user = upstream_name("login-0")
    for _ in range(env.settings.login_samples):
        client, seconds = imap_login(env.direct_imaps, env.lab_context,
                                     env.xoauth2(direct_user))
        client.logout()
        direct.append(seconds)
        if gateway_error is None:
            try:
                client, seconds = imap_login(env.gateway_endpoint("imap"), env._gw_context(),
                                             env.gateway_login("mg-login-0"))
                client.logout()
                gateway.append(seconds)
            except Exception as exc:  # noqa: BLE001
                gateway_error = reason(exc)

    def latency(samples: list[float], error: str | None) -> Measurement:
        if error is not None or not samples:
            return Measurement.missing(error or "no samples")
        ms = _ms(samples)
        return Measurement(median(ms), "ms", f"p99 {percentile(ms, 99):.1f} ms",
                           extra={"median_ms": median(ms), "p99_ms": percentile(ms, 99),
                                  "samples": len(ms)})

    return [Figure(
        "1", "IMAP login over TLS, median (token cached)",
        RAW_CLIENT + "; sequential, interleaved with the baseline",
        latency(gateway, gateway_error), latency(direct, None),
        MaxDelta(5.0, "ms"),
        notes=(f"{env.settings.login_samples} logins per side: TCP connect, TLS handshake, "
               "greeting, LOGIN (mailgate) / AUTHENTICATE XOAUTH2 with SASL-IR (Dovecot) "
               "-> tagged OK; LOGOUT not timed",),
    )]


# ------------------------------------------------------------------------------ figures 2, 3


def _login_spec(env: BenchEnv, gateway: bool, clients: int, duration: float = 0.0) -> LoadSpec:
    if gateway:
        endpoint = env.gateway_endpoint("imap")
        creds = tuple(env.gateway_login(f"mg-login-{i}") for i in range(LOGIN_USERS))
    else:
        endpoint = env.direct_imaps
        creds = tuple(env.xoauth2(upstream_name(f"login-{i}")) for i in range(LOGIN_USERS))
    return LoadSpec(endpoint, creds, clients, duration=duration)


def _load_errors(result: LoadResult) -> str:
    if not result.errors:
        return ""
    kind, count = result.errors.most_common(1)[0]
    return f"; most common failure ({count}x): {kind}"


def fig_login_rate(env: BenchEnv) -> list[Figure]:
    s = env.settings

    def rate(gateway: bool) -> Measurement:
        spec = _login_spec(env, gateway, s.load_clients, s.load_duration)
        probe = _gateway_cpu(env) if gateway else _dovecot_cpu(env)
        before = probe() if probe else (0.0, 0.0)
        result = env.pool.run(login_loop, spec)
        after = probe() if probe else (0.0, 0.0)
        if not result.logins:
            raise RuntimeError("no login succeeded" + _load_errors(result))
        per_second = result.logins / result.elapsed
        ms = _ms(result.latencies)
        cpu_ms = (sum(after) - sum(before)) * 1000 / result.logins
        who = "mailgate" if gateway else "Dovecot"
        return Measurement(
            per_second, "logins/s",
            f"p50 {median(ms):.0f} ms, {result.failures} failed; {who} CPU {cpu_ms:.1f} ms/login",
            extra={"logins": result.logins, "failures": result.failures,
                   "seconds": result.elapsed, "p50_ms": median(ms),
                   "p99_ms": percentile(ms, 99), "errors": dict(result.errors),
                   f"{who}_cpu_ms_per_login": cpu_ms},
        )

    baseline = attempt(lambda: rate(False))
    mailgate = attempt(lambda: rate(True))
    notes = [f"each client: connect, TLS, login, LOGOUT, again, for {s.load_duration:g} s; "
             f"sessions spread over {LOGIN_USERS} accounts"]
    dovecot_ms = baseline.extra.get("Dovecot_cpu_ms_per_login")
    mailgate_ms = mailgate.extra.get("mailgate_cpu_ms_per_login")
    if dovecot_ms and mailgate_ms:
        notes.append(
            "a login through mailgate that finds no pooled upstream connection also costs a "
            "full Dovecot login upstream: for such logins, when CPU is the limit, the ratio "
            f"cannot exceed {dovecot_ms:.1f} / ({dovecot_ms:.1f} + "
            f"{mailgate_ms:.1f}) = {login_ratio_ceiling(dovecot_ms, mailgate_ms):.2f}")
    return [Figure(
        "2", f"logins/s, {s.load_clients} concurrent clients", LOAD_CLIENT,
        mailgate, baseline, MinRatio(0.8), notes=tuple(notes),
    )]


def login_ratio_ceiling(upstream_ms: float, gateway_ms: float) -> float:
    """Best logins/s ratio when CPU is the limit and every gateway login also pays for one
    upstream login: ``upstream / (upstream + gateway)``."""
    return upstream_ms / (upstream_ms + gateway_ms)


def fig_burst(env: BenchEnv) -> list[Figure]:
    s = env.settings

    def herd(gateway: bool) -> Measurement:
        result = env.pool.run(burst, _login_spec(env, gateway, s.burst_clients))
        ms = _ms(result.latencies) or [0.0]
        return Measurement(
            result.elapsed, "s",
            f"{result.failures} failed, p99 login {percentile(ms, 99):.0f} ms"
            + _load_errors(result),
            extra={"logins": result.logins, "failures": result.failures,
                   "p50_ms": median(ms), "p99_ms": percentile(ms, 99),
                   "errors": dict(result.errors)},
        )

    baseline = attempt(lambda: herd(False))
    mailgate = attempt(lambda: herd(True))
    return [Figure(
        "3", f"burst: {s.burst_clients} clients log in at once (time to all in)", LOAD_CLIENT,
        mailgate, baseline, ZeroFailures(),
        notes=("value: seconds from the common start until the last client is logged in "
               "(ratio: lower is better); every session stays open until all are in",),
    )]


# ------------------------------------------------------------------------------ figure 4


def fig_small_fetch(env: BenchEnv) -> list[Figure]:
    s = env.settings
    direct_session = env.direct_imap(upstream_name("small"))
    direct_session.select()
    gateway_session: IMAPClient | None = None
    gateway_error = env.why_not("imap")
    if gateway_error is None:
        try:
            gateway_session = env.gateway_imap("mg-small")
            gateway_session.select()
        except Exception as exc:  # noqa: BLE001
            gateway_error = reason(exc)
    direct: list[float] = []
    gateway: list[float] = []
    try:
        for i in range(s.fetch_round_trips + WARMUP_ROUND_TRIPS):
            seconds = _timed_fetch(direct_session, 1)
            if i >= WARMUP_ROUND_TRIPS:
                direct.append(seconds)
            if gateway_session is not None and gateway_error is None:
                try:
                    seconds = _timed_fetch(gateway_session, 1)
                except Exception as exc:  # noqa: BLE001
                    gateway_error = reason(exc)
                    continue
                if i >= WARMUP_ROUND_TRIPS:
                    gateway.append(seconds)
    finally:
        direct_session.logout()
        if gateway_session is not None:
            gateway_session.logout()

    def rtt(samples: list[float], error: str | None) -> Measurement:
        if error is not None or not samples:
            return Measurement.missing(error or "no samples")
        ms = _ms(samples)
        return Measurement(median(ms), "ms", f"p99 {percentile(ms, 99):.2f} ms",
                           extra={"median_ms": median(ms), "p99_ms": percentile(ms, 99),
                                  "samples": len(ms)})

    return [Figure(
        "4", "small FETCH round trip (2 KB message), median", RAW_CLIENT
        + "; one logged-in session per side, interleaved",
        rtt(gateway, gateway_error), rtt(direct, None), MaxDelta(0.5, "ms"),
        notes=(f"{s.fetch_round_trips} x UID FETCH 1 (BODY.PEEK[]) per side after "
               f"{WARMUP_ROUND_TRIPS} warm-up round trips",),
    )]


WARMUP_ROUND_TRIPS = 20


def _timed_fetch(session: IMAPClient, uid: int) -> float:
    start = time.perf_counter()
    session.fetch_body(uid)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ figures 5, 6


CpuProbe = Callable[[], tuple[float, float]]
Transfer = Callable[[], tuple[int, float]]


def _throughput(samples: list[tuple[int, float]], cpu: list[tuple[float, float]],
                who: str) -> Measurement:
    """Median MB/s of ``(bytes, seconds)`` samples, with the server's CPU time per transfer
    (``cpu``: (user, system) seconds per sample; ``who`` names the server)."""
    rates = [megabytes_per_second(n, sec) for n, sec in samples]
    extra: dict[str, object] = {"rates_mb_s": rates, "bytes": samples[0][0]}
    detail = f"min {min(rates):.0f}"
    if cpu:
        per_transfer = [u + s for u, s in cpu]
        busy = [c / sec for c, (_, sec) in zip(per_transfer, samples)]
        extra.update({f"{who}_cpu_s": per_transfer, f"{who}_cpu_per_wall": busy,
                      f"{who}_user_share": sum(u for u, _ in cpu) / max(1e-9, sum(per_transfer))})
        detail += (f"; {who} CPU {median(per_transfer) * 1000:.0f} ms"
                   f" = {median(busy):.0%} of wall")
    return Measurement(median(rates), "MB/s", detail, extra=extra)


def _timed_cpu(transfer: Transfer, probe: CpuProbe | None
               ) -> tuple[tuple[int, float], tuple[float, float] | None]:
    before = probe() if probe else None
    sample = transfer()
    if probe is None or before is None:
        return sample, None
    after = probe()
    return sample, (after[0] - before[0], after[1] - before[1])


def _interleaved(runs: int, direct: Transfer, gateway: Transfer | None,
                 gateway_error: str | None, direct_cpu: CpuProbe | None = None,
                 gateway_cpu: CpuProbe | None = None) -> tuple[Measurement, Measurement]:
    """``runs`` timed transfers per side, alternating, after one untimed warm-up each; the
    CPU probes are read around every timed transfer (Dovecot's, mailgate's CPU time)."""
    d: list[tuple[int, float]] = []
    g: list[tuple[int, float]] = []
    d_cpu: list[tuple[float, float]] = []
    g_cpu: list[tuple[float, float]] = []
    direct()
    if gateway is not None and gateway_error is None:
        try:
            gateway()
        except Exception as exc:  # noqa: BLE001
            gateway_error = reason(exc)
    for _ in range(runs):
        sample, cpu = _timed_cpu(direct, direct_cpu)
        d.append(sample)
        if cpu:
            d_cpu.append(cpu)
        if gateway is not None and gateway_error is None:
            try:
                sample, cpu = _timed_cpu(gateway, gateway_cpu)
            except Exception as exc:  # noqa: BLE001
                gateway_error = reason(exc)
                continue
            g.append(sample)
            if cpu:
                g_cpu.append(cpu)
    baseline = _throughput(d, d_cpu, "Dovecot")
    if gateway_error is not None or not g:
        return Measurement.missing(gateway_error or "no samples"), baseline
    return _throughput(g, g_cpu, "mailgate"), baseline


def _dovecot_cpu(env: BenchEnv) -> CpuProbe | None:
    """(user, system) CPU time of Dovecot: the master, its live processes (imap, imap-login,
    auth, ...) and the ones that have ended."""
    if not env.info.dovecot_pid:
        return None
    master = env.info.dovecot_pid
    return lambda: procstat.tree_cpu_times(master)


def _gateway_cpu(env: BenchEnv) -> CpuProbe | None:
    if env.gateway is None:
        return None
    pid = env.gateway.pid
    return lambda: procstat.cpu_times(pid)


def _fetch_timer(session: IMAPClient) -> Callable[[], tuple[int, float]]:
    def run() -> tuple[int, float]:
        start = time.perf_counter()
        size = session.fetch_body(1)
        return size, time.perf_counter() - start
    return run


def _retr_timer(session: POP3Client) -> Callable[[], tuple[int, float]]:
    def run() -> tuple[int, float]:
        start = time.perf_counter()
        size = session.multiline(b"RETR 1")
        return size, time.perf_counter() - start
    return run


def fig_big_fetch(env: BenchEnv) -> list[Figure]:
    direct_session = env.direct_imap(upstream_name("big20"))
    direct_session.select()
    gateway_session: IMAPClient | None = None
    error = env.why_not("imap")
    try:
        if error is None:
            try:
                gateway_session = env.gateway_imap("mg-big20")
                gateway_session.select()
            except Exception as exc:  # noqa: BLE001
                error = reason(exc)
        mailgate, baseline = _interleaved(
            env.settings.transfer_repeats, _fetch_timer(direct_session),
            _fetch_timer(gateway_session) if gateway_session else None, error,
            _dovecot_cpu(env), _gateway_cpu(env))
    finally:
        direct_session.logout()
        if gateway_session is not None:
            gateway_session.logout()
    return [Figure(
        "5", "20 MB FETCH over IMAPS, throughput", RAW_CLIENT + "; FETCH -> tagged OK timed",
        mailgate, baseline, MinRatio(0.8),
        notes=(f"{env.settings.transfer_repeats} x UID FETCH 1 (BODY.PEEK[]) of a "
               f"{BIG_TRANSFER // MEGABYTE} MB message per side, one session each, after one "
               "warm-up; median",),
    )]


def fig_big_retr(env: BenchEnv) -> list[Figure]:
    direct_session = env.direct_pop3(upstream_name("big20"))
    gateway_session: POP3Client | None = None
    error = env.why_not("pop3")
    try:
        if error is None:
            try:
                gateway_session = env.gateway_pop3("mg-big20")
            except Exception as exc:  # noqa: BLE001
                error = reason(exc)
        mailgate, baseline = _interleaved(
            env.settings.transfer_repeats, _retr_timer(direct_session),
            _retr_timer(gateway_session) if gateway_session else None, error,
            _dovecot_cpu(env), _gateway_cpu(env))
    finally:
        direct_session.close()  # no QUIT: nothing changes in the mailbox
        if gateway_session is not None:
            gateway_session.close()
    return [Figure(
        "6", "20 MB RETR over POP3S, throughput", RAW_CLIENT + "; RETR -> final '.' timed",
        mailgate, baseline, MinRatio(1.0),
        notes=("baseline: Dovecot's own POP3S (USER/PASS) on the same message; "
               f"{env.settings.transfer_repeats} x RETR 1 per session after one warm-up; "
               "median",),
    )]


# ------------------------------------------------------------------------------ figure 7


def _peak_growth(pid: int, transfer: Callable[[], int]) -> Measurement:
    """Peak RSS growth of ``pid`` while ``transfer`` runs, in MB."""
    if procstat.reset_peak(pid):
        before = procstat.rss_kib(pid)
        size = transfer()
        peak = procstat.hwm_kib(pid)
        method = "VmHWM after, peak reset before (clear_refs)"
    else:
        with procstat.PeakSampler(pid) as sampler:
            size = transfer()
        before, peak = sampler.start_kib, sampler.peak_kib
        method = "VmRSS sampled every 2 ms"
    growth_mb = max(0, peak - before) * 1024 / MEGABYTE
    return Measurement(growth_mb, "MB", f"{before / 1024:.0f} -> peak {peak / 1024:.0f} MiB",
                       extra={"rss_before_kib": before, "peak_kib": peak, "bytes": size,
                              "method": method})


def fig_transfer_memory(env: BenchEnv) -> list[Figure]:
    size_mb = Measurement(HUGE_TRANSFER / MEGABYTE, "MB", "message size")

    def retr() -> Measurement:
        session = env.gateway_pop3("mg-big50")
        try:
            return _peak_growth(env.gateway_pid, lambda: session.multiline(b"RETR 1"))
        finally:
            session.close()

    def fetch() -> Measurement:
        session = env.gateway_imap("mg-big50")
        try:
            session.select()
            return _peak_growth(env.gateway_pid, lambda: session.fetch_body(1))
        finally:
            session.logout()

    note = ("baseline: the message size (ratio = growth / size); growth = peak RSS during "
            "the transfer - RSS just before it, after login")
    return [
        Figure("7a", "mailgate peak RSS growth, 50 MB RETR", RAW_CLIENT, attempt(retr),
               size_mb, MaxValue(RSS_GROWTH_TARGET_MB, "MB"), notes=(note,)),
        Figure("7b", "mailgate peak RSS growth, 50 MB FETCH", RAW_CLIENT, attempt(fetch),
               size_mb, MaxValue(RSS_GROWTH_TARGET_MB, "MB"), notes=(note,)),
    ]


# ------------------------------------------------------------------------------ figure 8


def _open_idle(env: BenchEnv, name: str) -> IMAPClient:
    session = env.gateway_imap(name)
    try:
        session.select()
        session.idle()
    except BaseException:
        session.close()
        raise
    return session


def _dovecot_processes(env: BenchEnv) -> list[int]:
    return procstat.children(env.info.dovecot_pid) if env.info.dovecot_pid else []


def _wait_reaped(env: BenchEnv, count: int) -> None:
    deadline = time.monotonic() + REAP_TIMEOUT
    while len(_dovecot_processes(env)) > count and time.monotonic() < deadline:
        time.sleep(0.2)


def fig_idle_sessions(env: BenchEnv) -> list[Figure]:
    s = env.settings
    n = s.idle_sessions
    result: dict[str, Measurement] = {}

    def measure() -> None:
        names = [f"mg-login-{i % LOGIN_USERS}" for i in range(n)]
        env.restart_gateway(sorted(set(names)))
        pid = env.gateway_pid
        base_procs = len(_dovecot_processes(env))
        rss_before = procstat.rss_kib(pid)
        dovecot_before = procstat.pss_kib(_dovecot_processes(env))
        sessions: list[IMAPClient] = []
        failures: list[str] = []
        with ThreadPoolExecutor(IDLE_OPEN_CONCURRENCY) as pool:
            futures = [pool.submit(_open_idle, env, name) for name in names]
            for future in futures:
                try:
                    sessions.append(future.result())
                except Exception as exc:  # noqa: BLE001
                    failures.append(f"{type(exc).__name__}: {str(exc)[:100]}")
        try:
            if not sessions:
                raise RuntimeError("no idle session opened: " + (failures or ["?"])[0])
            time.sleep(IDLE_SETTLE)
            rss_after = procstat.rss_kib(pid)
            dovecot_pids = _dovecot_processes(env)
            dovecot_after = procstat.pss_kib(dovecot_pids)
            cpu_before = procstat.cpu_seconds(pid)
            dovecot_probe = _dovecot_cpu(env)
            dovecot_cpu_before = sum(dovecot_probe()) if dovecot_probe else 0.0
            with env.profile_window("8-idle") if env.profile_window else nullcontext():
                time.sleep(s.idle_window)
            cpu = (procstat.cpu_seconds(pid) - cpu_before) / s.idle_window * 100
            dovecot_cpu = ((sum(dovecot_probe()) if dovecot_probe else 0.0)
                           - dovecot_cpu_before) / s.idle_window * 100
        finally:
            for session in sessions:
                session.close()
        opened = len(sessions)
        fail_text = f", {len(failures)} failed to open" if failures else ""
        per_session = (rss_after - rss_before) * 1024 / 1000 / opened  # KB (decimal)
        result["rss"] = Measurement(
            per_session, "KB/session",
            f"{opened} sessions, RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB"
            + fail_text,
            extra={"sessions": opened, "failures": len(failures),
                   "rss_before_kib": rss_before, "rss_after_kib": rss_after,
                   "errors": failures[:5]})
        result["rss_base"] = Measurement(
            (dovecot_after - dovecot_before) * 1024 / 1000 / opened, "KB/session",
            "Dovecot PSS, upstream side",
            extra={"pss_before_kib": dovecot_before, "pss_after_kib": dovecot_after})
        result["cpu"] = Measurement(cpu, "% of a core", f"over {s.idle_window:g} s",
                                    extra={"window_s": s.idle_window})
        result["cpu_base"] = Measurement(dovecot_cpu, "% of a core", "Dovecot, upstream side")
        _wait_reaped(env, base_procs)

    problem = attempt(lambda: (measure(), Measurement(0.0))[1])
    if not problem.ok:
        result = {k: problem for k in ("rss", "cpu")}
        result["rss_base"] = result["cpu_base"] = Measurement.missing(
            "measured on the same sessions")
    client = (f"{IDLE_OPEN_CONCURRENCY} opener threads in the benchmark process (LOGIN, "
              "SELECT INBOX, IDLE), then idle")
    return [
        Figure("8a", f"{n} idle IMAP sessions (IDLE): memory per session", client,
               result["rss"], result["rss_base"], MaxValue(IDLE_SESSION_TARGET_KB, "KB"),
               notes=("mailgate: VmRSS growth / sessions, in a freshly started mailgate "
                      "(one warm-up login per account): memory freed by earlier figures "
                      "would hide part of the cost; baseline: Dovecot's PSS growth "
                      "(imap + imap-login processes) for the same sessions upstream",)),
        Figure("8b", f"{n} idle IMAP sessions: CPU while idle", client,
               result["cpu"], result["cpu_base"],
               MaxValue(IDLE_CPU_TARGET_PERCENT, "% of a core"),
               notes=("utime+stime from /proc over the window",)),
    ]


# ------------------------------------------------------------------------------ figure 9


def _pop_session(connect: Callable[[], POP3Client]) -> tuple[float, int, int]:
    """connect + login + STAT + UIDL; (seconds, messages, UIDL lines' bytes)."""
    start = time.perf_counter()
    session = connect()
    try:
        count, _ = session.stat()
        uidl_bytes = session.multiline(b"UIDL")
        seconds = time.perf_counter() - start
    finally:
        session.quit()
    return seconds, count, uidl_bytes


def _cpu_text(probes: dict[str, CpuProbe | None], before: dict[str, float]
              ) -> tuple[str, dict[str, float]]:
    """"mailgate CPU 1.2 s, Dovecot CPU 0.8 s" for the probes read before (``before``)."""
    used = {who: sum(probe()) - before[who] for who, probe in probes.items() if probe}
    return (", ".join(f"{who} CPU {sec * 1000:.0f} ms" for who, sec in used.items()),
            {f"{who}_cpu_s": sec for who, sec in used.items()})


def fig_pop_big_mailbox(env: BenchEnv) -> list[Figure]:
    s = env.settings
    direct_user = upstream_name("pop-direct")

    def series(connect: Callable[[], POP3Client], probes: dict[str, CpuProbe | None]
               ) -> tuple[Measurement, Measurement]:
        before = {who: sum(probe()) for who, probe in probes.items() if probe}
        first, count, _ = _pop_session(connect)
        cpu, cpu_extra = _cpu_text(probes, before)
        later = [_pop_session(connect)[0] for _ in range(s.pop_later_sessions)]
        if count != s.pop_messages:
            raise RuntimeError(f"STAT said {count} messages, {s.pop_messages} were seeded")
        return (Measurement(first * 1000, "ms", f"{count} messages; {cpu}", extra=cpu_extra),
                Measurement(median(later) * 1000, "ms",
                            f"median of {len(later)}", extra={"samples_ms": _ms(later)}))

    direct = series(lambda: env.direct_pop3(direct_user), {"Dovecot": _dovecot_cpu(env)})
    gateway_first: Measurement
    gateway_later: Measurement
    try:
        if (why := env.why_not("pop3")) is not None:
            raise Unavailable(why)
        gateway_first, gateway_later = series(
            lambda: env.gateway_pop3("mg-pop"),
            {"mailgate": _gateway_cpu(env), "Dovecot": _dovecot_cpu(env)})
    except Exception as exc:  # noqa: BLE001
        gateway_first = gateway_later = Measurement.missing(reason(exc))
    note = ("connect + TLS + USER/PASS + STAT + UIDL -> final '.'; mailgate and Dovecot each "
            "read an identically seeded, never-before-opened twin mailbox")
    return [
        Figure("9a", f"POP3 login+STAT+UIDL, {s.pop_messages} messages, first session",
               RAW_CLIENT, gateway_first, direct[0], NoTarget(), notes=(note,)),
        Figure("9b", f"POP3 login+STAT+UIDL, {s.pop_messages} messages, later session",
               RAW_CLIENT, gateway_later, direct[1], NoTarget(), notes=(note,)),
    ]


# ------------------------------------------------------------------------------ figure 10

#: The flood of figure 10 (the security review's): unknown user names from three addresses.
FLOOD_ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
FLOOD_LOGINS = 300
#: Threads sending the flood (each one login at a time, so the flood is this many deep).
FLOOD_THREADS = 150
#: The review's bound for a legitimate login during the flood: "within a few seconds".
FLOOD_LOGIN_TARGET_MS = 3000.0
FLOOD_CLIENT = (f"raw ssl sockets, {FLOOD_THREADS} threads in the benchmark process (the flood); "
                "raw ssl socket (the measured login)")
#: The flooding clients' patience: a refused guess is answered after the penalty (<= 15 s).
FLOOD_CLIENT_TIMEOUT = 60.0


def _flood_login(endpoint: Endpoint, context: ssl.SSLContext, local: str, n: int) -> bool:
    """One IMAP LOGIN with an unknown user name from ``local``; True if it was answered."""
    import socket

    try:
        raw = socket.create_connection((endpoint.host, endpoint.port),
                                       timeout=FLOOD_CLIENT_TIMEOUT, source_address=(local, 0))
    except OSError:
        return False
    try:
        sock = context.wrap_socket(raw, server_hostname=endpoint.server_name)
        sock.settimeout(FLOOD_CLIENT_TIMEOUT)
        data = b""
        sock.sendall(f'a LOGIN "nobody-{n}-{secrets.token_hex(4)}" "guess-{n}-xyz"\r\n'.encode())
        while b"\r\na " not in data and not data.startswith(b"a "):
            chunk = sock.recv(4096)
            if not chunk:
                return False
            data += chunk
        return True
    except OSError:
        return False
    finally:
        raw.close()


def fig_login_during_flood(env: BenchEnv) -> list[Figure]:
    """An uncached IMAP login from a device in good standing during a flood of unknown names."""
    name = "mg-login-1"
    if (why := env.why_not("imap")) is not None:
        missing = Measurement.missing(why)
        return [Figure("10", "IMAP login, uncached, during a flood of unknown user names",
                       RAW_CLIENT, missing, missing, MaxValue(FLOOD_LOGIN_TARGET_MS, "ms"))]
    samples = 1 if env.settings.quick else 3

    def uncached_login() -> float:
        """A login right after a restart: nothing cached, the address remembered."""
        client, seconds = imap_login(env.gateway_endpoint("imap"), env._gw_context(),
                                     env.gateway_login(name))
        client.logout()
        return seconds

    def fresh() -> None:
        assert env.gateway is not None
        env.gateway.stop()
        env.gateway.start()

    env.warm_up([name])  # the device logs in once: its address is remembered in the store
    quiet: list[float] = []
    flooded: list[float] = []
    answered = 0
    for _ in range(samples):
        fresh()
        quiet.append(uncached_login())
        fresh()
        endpoint, context = env.gateway_endpoint("imap"), env._gw_context()
        with ThreadPoolExecutor(FLOOD_THREADS) as pool:
            flood = [pool.submit(_flood_login, endpoint, context,
                                 FLOOD_ADDRESSES[n % len(FLOOD_ADDRESSES)], n)
                     for n in range(FLOOD_LOGINS)]
            time.sleep(0.5)  # the flood has reached mailgate and waits for its KDF
            flooded.append(uncached_login())
            answered += sum(f.result() for f in flood)
    note = (f"{FLOOD_LOGINS} LOGINs with random unknown names from {len(FLOOD_ADDRESSES)} "
            f"addresses, {FLOOD_THREADS} at a time, right after a restart; the measured login "
            f"comes from an address remembered for its user; baseline: the same uncached login "
            f"without the flood; {answered} of {FLOOD_LOGINS * samples} flood logins answered")
    detail = f"median of {samples}" if samples > 1 else "1 sample"
    return [Figure(
        "10", "IMAP login, uncached, during a flood of unknown user names", FLOOD_CLIENT,
        Measurement(median(flooded) * 1000, "ms", detail,
                    extra={"samples_ms": _ms(flooded), "flood_answered": answered}),
        Measurement(median(quiet) * 1000, "ms", f"{detail}, no flood",
                    extra={"samples_ms": _ms(quiet)}),
        MaxValue(FLOOD_LOGIN_TARGET_MS, "ms"), notes=(note,),
    )]


#: figure number -> function
FIGURES: dict[int, Callable[[BenchEnv], list[Figure]]] = {
    1: fig_login_latency,
    2: fig_login_rate,
    3: fig_burst,
    4: fig_small_fetch,
    5: fig_big_fetch,
    6: fig_big_retr,
    7: fig_transfer_memory,
    8: fig_idle_sessions,
    9: fig_pop_big_mailbox,
    10: fig_login_during_flood,
}


def machine_description(dovecot_version: str) -> dict[str, object]:
    """CPU, cores, memory, kernel and versions: what the docs' table is measured on."""
    import os
    import platform

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        mem_kib = procstat.parse_status_kib(Path("/proc/meminfo").read_text(), "MemTotal")
    except (OSError, KeyError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "dovecot": dovecot_version,
    }
