"""Figure 12: SMTP submission through mailgate against the lab's submission server directly.

Theory of operation
-------------------
Both sides are driven by the same blocking client (:class:`SmtpClient`, a raw ``ssl`` socket,
implicit TLS): directly to Dovecot's submission service with ``AUTH XOAUTH2`` and a lab token,
and through mailgate's SMTP listener with ``AUTH PLAIN`` and the local password. Dovecot relays
every message to the lab's sink before it answers, on both sides alike, so the ratio compares
the paths, not the sink.

* 12a -- a 20 MB message (base64 lines: no dot-stuffing needed), sent ``transfer_repeats``
  times per side, interleaved, after one warm-up each; median MB/s from the first MAIL to the
  final 250. Target ≥ 0.9×.
* 12b -- 100 concurrent small submissions (threads, one connection each: connect, AUTH, one
  message, QUIT), per side; 0 failures through mailgate, and the ratio of messages per second.
* 12c -- mailgate's peak RSS growth during one 20 MB submission (≤ 5 MB: the message is
  streamed, never held).
"""

from __future__ import annotations

import base64
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from bench.figures import (
    RAW_CLIENT,
    RSS_GROWTH_TARGET_MB,
    BenchEnv,
    Unavailable,
    ZeroFailures,
    _dovecot_cpu,
    _gateway_cpu,
    _interleaved,
    _peak_growth,
    attempt,
    reason,
    upstream_name,
)
from bench.stats import MEGABYTE, Figure, MaxValue, Measurement, MinRatio
from bench.wire import Credentials, Endpoint, client_context, xoauth2_initial_response

__all__ = ["FIGURE", "SMTP_GROUP", "SMTP_USER", "SmtpClient", "fig_smtp_submission", "register"]

#: The figure's number in ``python -m bench --only``.
FIGURE = 12

#: The mailgate user of the figure and its upstream mailbox group.
SMTP_USER = "mg-smtp"
SMTP_GROUP = "smtp"
#: Size of the big submission (the issue's 20 MB) and of the small ones.
BIG_SUBMISSION = 20 * MEGABYTE
SMALL_BODY_LINES = 20
#: Concurrent small submissions (the issue's 100).
CONCURRENT_SUBMISSIONS = 100
#: Bytes per socket write of the message data.
SEND_CHUNK = 64 * 1024
IO_TIMEOUT = 120.0
RCPT = "bench-sink@example.net"


class SmtpError(Exception):
    """An SMTP reply the benchmark did not expect."""


class SmtpClient:
    """Blocking SMTP over implicit TLS; just what the figure needs."""

    def __init__(self, endpoint: Endpoint, context: ssl.SSLContext) -> None:
        raw = socket.create_connection((endpoint.host, endpoint.port), timeout=IO_TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname=endpoint.server_name)
        self.buf = b""
        self.expect(220)
        self.command(b"EHLO bench.example", 250)

    def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    raise SmtpError("connection closed")
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)

    def expect(self, code: int) -> bytes:
        got, text = self.reply()
        if got != code:
            raise SmtpError(f"expected {code}, got {text[:120]!r}")
        return text

    def command(self, line: bytes, code: int) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.expect(code)

    def login(self, credentials: Credentials) -> None:
        if credentials.mechanism == "xoauth2":
            initial = xoauth2_initial_response(credentials.user, credentials.secret)
            self.command(b"AUTH XOAUTH2 " + initial, 235)
        else:
            plain = base64.b64encode(f"\0{credentials.user}\0{credentials.secret}".encode())
            self.command(b"AUTH PLAIN " + plain, 235)

    def send(self, sender: str, chunks: Iterator[bytes] | list[bytes]) -> int:
        """One message (already CRLF-terminated, no line starting with a dot); its size."""
        self.command(f"MAIL FROM:<{sender}>".encode(), 250)
        self.command(f"RCPT TO:<{RCPT}>".encode(), 250)
        self.command(b"DATA", 354)
        size = 0
        for chunk in chunks:
            self.sock.sendall(chunk)
            size += len(chunk)
        self.sock.sendall(b".\r\n")
        self.expect(250)
        return size

    def quit(self) -> None:
        try:
            self.command(b"QUIT", 221)
        finally:
            self.sock.close()


def big_message(size: int) -> list[bytes]:
    """A message of about ``size`` bytes of base64 lines, in :data:`SEND_CHUNK` pieces."""
    header = (b"From: bench\r\nSubject: 20 MB submission\r\nContent-Type: application/octet-stream"
              b"\r\nContent-Transfer-Encoding: base64\r\n\r\n")
    line = base64.b64encode(bytes(range(256)))[:76] + b"\r\n"
    data = header + line * ((size - len(header)) // len(line))
    return [data[i:i + SEND_CHUNK] for i in range(0, len(data), SEND_CHUNK)]


def small_message(n: int) -> list[bytes]:
    body = b"".join(b"line %d of message %d\r\n" % (i, n) for i in range(SMALL_BODY_LINES))
    return [b"From: bench\r\nSubject: small %d\r\n\r\n" % n + body]


class _Side:
    """One side of the figure: where to connect, how to log in, as whom to send."""

    def __init__(self, endpoint: Endpoint, credentials: Credentials, sender: str) -> None:
        self.endpoint = endpoint
        self.context = client_context(endpoint.ca_file)
        self.credentials = credentials
        self.sender = sender

    def session(self) -> SmtpClient:
        client = SmtpClient(self.endpoint, self.context)
        client.login(self.credentials)
        return client


def _sides(env: BenchEnv) -> tuple[_Side, _Side | None, str | None]:
    upstream = upstream_name(SMTP_GROUP)
    direct = _Side(Endpoint(env.info.host, env.info.ports["submissions"], env.info.ca_file),
                   env.xoauth2(upstream), upstream)
    try:
        gateway = _Side(env.gateway_endpoint("smtp"), env.gateway_login(SMTP_USER), upstream)
    except (Unavailable, KeyError) as exc:
        return direct, None, reason(exc)
    return direct, gateway, None


def _transfer(side: _Side, message: list[bytes]):  # type: ignore[no-untyped-def]
    client = side.session()

    def run() -> tuple[int, float]:
        start = time.perf_counter()
        size = client.send(side.sender, message)
        return size, time.perf_counter() - start

    return client, run


def _concurrent(side: _Side) -> Measurement:
    failures: list[str] = []

    def one(n: int) -> None:
        try:
            client = side.session()
            client.send(side.sender, small_message(n))
            client.quit()
        except Exception as exc:  # noqa: BLE001 - counted, reported
            failures.append(reason(exc))

    start = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENT_SUBMISSIONS) as pool:
        list(pool.map(one, range(CONCURRENT_SUBMISSIONS)))
    seconds = time.perf_counter() - start
    sent = CONCURRENT_SUBMISSIONS - len(failures)
    detail = f"{sent}/{CONCURRENT_SUBMISSIONS} in {seconds:.2f} s, {len(failures)} failures"
    if failures:
        detail += f" (first: {failures[0][:80]})"
    return Measurement(sent / seconds, "msg/s", detail,
                       extra={"failures": len(failures), "seconds": seconds})


def fig_smtp_submission(env: BenchEnv) -> list[Figure]:
    """SMTP submission: 20 MB throughput, 100 concurrent submissions, memory."""
    message = big_message(BIG_SUBMISSION)
    direct, gateway, error = _sides(env)
    direct_client, direct_run = _transfer(direct, message)
    gateway_client = None
    gateway_run = None
    if gateway is not None:
        try:
            gateway_client, gateway_run = _transfer(gateway, message)
        except Exception as exc:  # noqa: BLE001
            error = reason(exc)
    try:
        mailgate, baseline = _interleaved(env.settings.transfer_repeats, direct_run, gateway_run,
                                          error, _dovecot_cpu(env), _gateway_cpu(env))
    finally:
        direct_client.quit()
        if gateway_client is not None:
            gateway_client.quit()

    concurrent_direct = attempt(lambda: _concurrent(direct))
    if gateway is None:
        concurrent_gateway = Measurement.missing(error or "mailgate is not running")
    else:
        concurrent_gateway = attempt(lambda: _concurrent(gateway))

    def memory() -> Measurement:
        if gateway is None:
            raise Unavailable(error or "mailgate is not running")
        client = gateway.session()
        try:
            return _peak_growth(env.gateway_pid, lambda: client.send(gateway.sender, message))
        finally:
            client.quit()

    size = Measurement(BIG_SUBMISSION / MEGABYTE, "MB", "message size")
    return [
        Figure("12a", "20 MB SMTP submission, throughput", RAW_CLIENT + "; MAIL -> final 250 timed",
               mailgate, baseline, MinRatio(0.9),
               notes=(f"{env.settings.transfer_repeats} x one {BIG_SUBMISSION // MEGABYTE} MB message "
                      "per side over implicit TLS, one session each, after one warm-up; baseline: "
                      "Dovecot's submission service with XOAUTH2 (both relay to the lab sink); median",)),
        Figure("12b", "100 concurrent small SMTP submissions", "100 threads, raw ssl sockets, "
               "connect + AUTH + 1 message + QUIT each", concurrent_gateway, concurrent_direct,
               ZeroFailures(), notes=("ratio: messages per second through mailgate / directly",)),
        Figure("12c", "mailgate peak RSS growth, 20 MB submission", RAW_CLIENT, attempt(memory),
               size, MaxValue(RSS_GROWTH_TARGET_MB, "MB"),
               notes=("growth = peak RSS during the submission - RSS just before it, after AUTH",)),
    ]


def register(figures: dict[int, object], mailboxes_for: dict[int, set[str]]) -> None:
    """Add figure :data:`FIGURE` to the benchmark's tables (called by ``bench.__main__``)."""
    figures[FIGURE] = fig_smtp_submission
    mailboxes_for[FIGURE] = {SMTP_GROUP}
