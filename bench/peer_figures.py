"""The peers' columns: the same measurement as a figure, taken on a peer (bench/peers.py).

Theory of operation
-------------------
A figure of :mod:`bench.figures` measures mailgate against Dovecot; :func:`with_peers` then
measures the peers that figure has (:data:`PEER_FIGURES`) and attaches their values to the
figure's rows, so the table shows ``mailgate vs emailproxy`` / ``mailgate vs imapc`` with the
ratio mailgate / peer:

* emailproxy (IMAP): figures 1 (login), 2 (logins/s, 50 clients), 4 (small FETCH round trip),
  5 (20 MB FETCH);
* imapc (POP3): figures 6 (20 MB RETR, a new session per RETR: imapc keeps the last message it
  fetched for the session) and 9 (10,000-message login+STAT+UIDL, first session on
  its own never-opened twin mailbox, then later sessions).

The same client code drives a peer as mailgate and Dovecot (:mod:`bench.wire`, :mod:`bench.load`)
with the same sample counts, warm-ups and medians, and the same mailboxes upstream. A peer's
samples are taken right after the figure's own (not interleaved with them): the peer columns
answer "how far apart", and a noisy neighbour can move them more than the figure's own ratio.
A peer that is not running, or a measurement that fails, becomes ``n/a (reason)`` in its row.

Where a peer's behaviour differs from mailgate's it is measured as the peer behaves: emailproxy
derives its token key from the client's password with PBKDF2 on every login (its design), and
its login rate counts logins until the last one started in the window has finished (with
sub-second logins the figure's window alone would overstate it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from bench import procstat
from bench.figures import (
    LOGIN_USERS,
    WARMUP_ROUND_TRIPS,
    BenchEnv,
    CpuProbe,
    _cpu_text,
    _dovecot_cpu,
    _fetch_timer,
    _load_errors,
    _ms,
    _pop_session,
    _retr_timer,
    _throughput,
    _timed_cpu,
    _timed_fetch,
    reason,
    upstream_name,
)
from bench.load import START_DELAY, LoadSpec, login_loop
from bench.peers import EMAILPROXY, IMAPC, Peers
from bench.stats import Figure, Measurement, median, percentile
from bench.wire import Credentials, IMAPClient, POP3Client, client_context, imap_login

__all__ = ["PEER_FIGURES", "PEER_NOTES", "PEER_TWINS", "peer_users", "with_peers",
           "warm_up_peers"]

#: Most sequential logins measured through emailproxy for figure 1 (each costs it a
#: password-based key derivation of about half a second of CPU).
EMAILPROXY_LOGIN_SAMPLES = 40
#: Mailbox groups of :func:`bench.figures.upstream_name` seeded only for a peer: the imapc
#: twin of figure 9's POP3 mailbox (its first session must read a never-opened mailbox).
PEER_TWINS = ("pop-imapc",)

Measure = Callable[[BenchEnv, Peers], dict[str, Measurement]]


def _creds(peers: Peers, peer: str, user: str) -> Credentials:
    account = peers.account(peer, user)
    return Credentials("login", account.user, account.password)


def _imap(peers: Peers, user: str) -> IMAPClient:
    endpoint = peers.endpoints[EMAILPROXY]
    client, _ = imap_login(endpoint, client_context(endpoint.ca_file),
                           _creds(peers, EMAILPROXY, user))
    return client


def _pop3(peers: Peers, user: str) -> POP3Client:
    endpoint = peers.endpoints[IMAPC]
    client = POP3Client.connect(endpoint, client_context(endpoint.ca_file))
    client.login(_creds(peers, IMAPC, user))
    return client


def _cpu(peers: Peers, peer: str) -> CpuProbe:
    """CPU time of the peer: its process, and (imapc: Dovecot's master) every child."""
    pid = peers.processes[peer].pid
    return lambda: procstat.tree_cpu_times(pid)


def _latency(samples: list[float], digits: int) -> Measurement:
    ms = _ms(samples)
    return Measurement(median(ms), "ms", f"p99 {percentile(ms, 99):.{digits}f} ms",
                       extra={"median_ms": median(ms), "p99_ms": percentile(ms, 99),
                              "samples": len(ms)})


# ------------------------------------------------------------------------------ emailproxy


def emailproxy_login(env: BenchEnv, peers: Peers) -> dict[str, Measurement]:
    endpoint = peers.endpoints[EMAILPROXY]
    context = client_context(endpoint.ca_file)
    creds = _creds(peers, EMAILPROXY, upstream_name("login-0"))
    samples = []
    for _ in range(min(env.settings.login_samples, EMAILPROXY_LOGIN_SAMPLES)):
        client, seconds = imap_login(endpoint, context, creds)
        client.logout()
        samples.append(seconds)
    return {"1": _latency(samples, 1)}


def emailproxy_login_rate(env: BenchEnv, peers: Peers) -> dict[str, Measurement]:
    s = env.settings
    creds = tuple(_creds(peers, EMAILPROXY, upstream_name(f"login-{i}"))
                  for i in range(LOGIN_USERS))
    probe = _cpu(peers, EMAILPROXY)
    before = probe()
    started = time.time()
    result = env.pool.run(login_loop, LoadSpec(peers.endpoints[EMAILPROXY], creds,
                                               s.load_clients, duration=s.load_duration))
    wall = time.time() - started - START_DELAY
    after = probe()
    if not result.logins:
        raise RuntimeError("no login succeeded" + _load_errors(result))
    elapsed = max(result.elapsed, wall)
    ms = _ms(result.latencies)
    cpu_ms = (sum(after) - sum(before)) * 1000 / result.logins
    return {"2": Measurement(
        result.logins / elapsed, "logins/s",
        f"p50 {median(ms):.0f} ms, {result.failures} failed, {result.logins} logins in "
        f"{elapsed:.1f} s; emailproxy CPU {cpu_ms:.0f} ms/login",
        extra={"logins": result.logins, "failures": result.failures, "seconds": elapsed,
               "p50_ms": median(ms), "p99_ms": percentile(ms, 99),
               "errors": dict(result.errors), "emailproxy_cpu_ms_per_login": cpu_ms})}


def emailproxy_small_fetch(env: BenchEnv, peers: Peers) -> dict[str, Measurement]:
    session = _imap(peers, upstream_name("small"))
    samples = []
    try:
        session.select()
        for i in range(env.settings.fetch_round_trips + WARMUP_ROUND_TRIPS):
            seconds = _timed_fetch(session, 1)
            if i >= WARMUP_ROUND_TRIPS:
                samples.append(seconds)
    finally:
        session.logout()
    return {"4": _latency(samples, 2)}


def emailproxy_big_fetch(env: BenchEnv, peers: Peers) -> dict[str, Measurement]:
    session = _imap(peers, upstream_name("big20"))
    try:
        session.select()
        transfer = _fetch_timer(session)
        return {"5": _transfers(env, transfer, _cpu(peers, EMAILPROXY), EMAILPROXY)}
    finally:
        session.logout()


def _transfers(env: BenchEnv, transfer: Callable[[], tuple[int, float]], probe: CpuProbe,
               who: str) -> Measurement:
    """As the figure's own side: one untimed warm-up, then the timed transfers."""
    transfer()
    samples, cpu = [], []
    for _ in range(env.settings.transfer_repeats):
        sample, used = _timed_cpu(transfer, probe)
        samples.append(sample)
        if used:
            cpu.append(used)
    return _throughput(samples, cpu, who)


# ------------------------------------------------------------------------------ imapc


def imapc_big_retr(env: BenchEnv, peers: Peers) -> dict[str, Measurement]:
    """A new POP3 session for every RETR (login not timed): Dovecot's imapc keeps the last
    message it fetched in the session, so a second RETR 1 in the same session would be served
    from that local copy instead of from upstream."""
    user = upstream_name("big20")
    probe = _cpu(peers, IMAPC)
    samples, cpu = [], []
    for i in range(env.settings.transfer_repeats + 1):  # the first one is the warm-up
        session = _pop3(peers, user)
        try:
            sample, used = _timed_cpu(_retr_timer(session), probe)
        finally:
            session.close()  # no QUIT: nothing changes in the mailbox
        if i > 0:
            samples.append(sample)
            if used:
                cpu.append(used)
    return {"6": _throughput(samples, cpu, IMAPC)}


def imapc_big_mailbox(env: BenchEnv, peers: Peers) -> dict[str, Measurement]:
    s = env.settings
    user = upstream_name(PEER_TWINS[0])
    probes = {IMAPC: _cpu(peers, IMAPC), "lab Dovecot": _dovecot_cpu(env)}
    before = {who: sum(probe()) for who, probe in probes.items() if probe}
    first, count, _ = _pop_session(lambda: _pop3(peers, user))
    cpu, cpu_extra = _cpu_text(probes, before)
    later = [_pop_session(lambda: _pop3(peers, user))[0] for _ in range(s.pop_later_sessions)]
    if count != s.pop_messages:
        raise RuntimeError(f"STAT said {count} messages, {s.pop_messages} were seeded")
    return {
        "9a": Measurement(first * 1000, "ms", f"{count} messages; {cpu}", extra=cpu_extra),
        "9b": Measurement(median(later) * 1000, "ms", f"median of {len(later)}",
                          extra={"samples_ms": _ms(later)}),
    }


#: figure number -> peer -> its measurement (row key -> value)
PEER_FIGURES: dict[int, dict[str, Measure]] = {
    1: {EMAILPROXY: emailproxy_login},
    2: {EMAILPROXY: emailproxy_login_rate},
    4: {EMAILPROXY: emailproxy_small_fetch},
    5: {EMAILPROXY: emailproxy_big_fetch},
    6: {IMAPC: imapc_big_retr},
    9: {IMAPC: imapc_big_mailbox},
}

#: figure number -> what its peer rows need said beside them (method differences, known causes)
PEER_NOTES: dict[int, str] = {
    1: f"emailproxy: at most {EMAILPROXY_LOGIN_SAMPLES} logins, after the figure's own; each "
       "login derives its token key from the password (PBKDF2, 1.2M iterations)",
    2: "emailproxy: logins / time until the last login started in the window has finished",
    4: "emailproxy sets no TCP_NODELAY on client connections: a 2 KB answer forwarded in two "
       "writes waits for the client's delayed ACK (see docs/performance.md, Peers)",
    5: "emailproxy: the same transfers, after the figure's own",
    6: "imapc: a new POP3 session per RETR (login not timed): imapc keeps the last fetched "
       "message of a session",
    9: "imapc: its own never-opened twin mailbox; CPU of the imapc instance and of the lab "
       "Dovecot it reads from",
}

#: figure number -> peer -> mailbox groups (:func:`bench.figures.upstream_name`) it serves
_PEER_MAILBOXES: dict[int, dict[str, tuple[str, ...]]] = {
    1: {EMAILPROXY: ("login-0",)},
    2: {EMAILPROXY: tuple(f"login-{i}" for i in range(LOGIN_USERS))},
    4: {EMAILPROXY: ("small",)},
    5: {EMAILPROXY: ("big20",)},
    6: {IMAPC: ("big20",)},
    9: {IMAPC: PEER_TWINS},
}


def peer_users(selected: list[int]) -> dict[str, list[str]]:
    """peer -> the upstream users it must serve for the selected figures (sorted)."""
    users: dict[str, set[str]] = {}
    for number in selected:
        for peer, keys in _PEER_MAILBOXES.get(number, {}).items():
            users.setdefault(peer, set()).update(upstream_name(k) for k in keys)
    return {peer: sorted(names) for peer, names in users.items()}


def warm_up_peers(peers: Peers) -> dict[str, str]:
    """One login per emailproxy account (its first login in a process also loads code);
    returns ``{user: problem}`` for those that failed."""
    problems = {}
    if peers.why_not(EMAILPROXY) is None:
        for user in peers.accounts.get(EMAILPROXY, {}):
            try:
                _imap(peers, user).logout()
            except Exception as exc:  # noqa: BLE001 - its figures will say what fails
                problems[user] = reason(exc)
    return problems


def with_peers(number: int, rows: list[Figure], env: BenchEnv, peers: Peers) -> list[Figure]:
    """``rows`` (the figure's :class:`~bench.stats.Figure` rows) with the peers' values."""
    found: dict[str, list[tuple[str, Measurement]]] = {}
    for peer, measure in PEER_FIGURES.get(number, {}).items():
        why = peers.why_not(peer)
        try:
            if why is not None:
                raise RuntimeError(why)
            values = measure(env, peers)
        except Exception as exc:  # noqa: BLE001 - the peer's row says n/a, the run goes on
            text = why if why is not None else reason(exc)
            values = {row.key: Measurement.missing(text) for row in rows}
        for key, value in values.items():
            found.setdefault(key, []).append((peer, value))
    note = (PEER_NOTES[number],) if number in PEER_NOTES and found else ()
    return [replace(row, peers=row.peers + tuple(found.get(row.key, ())),
                    notes=row.notes + (note if row.key in found else ()))
            for row in rows]
