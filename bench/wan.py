"""The WAN figure: a POP3 poll and an IMAP login over a path with a fixed delay, direct vs mailgate.

Theory of operation
-------------------
``python -m bench.wan [--delay-ms 20] [--polls 10]`` starts the lab (Dovecot + OAuth server),
puts a :class:`DelayRelay` -- a loopback TCP relay that holds every chunk for a fixed one-way
time in each direction (``tc netem`` is not available on these machines) -- in front of
Dovecot's IMAPS and POP3S, and starts mailgate (its own process) whose upstream is the IMAPS
relay. So **both** the direct baseline and mailgate's upstream pay the same round trip time
(2 × the delay), and the client ⇄ mailgate hop is plain loopback (mailgate runs next to the
client, the provider is far away):

* **10a** POP3 poll (connect, TLS, USER/PASS, STAT, UIDL, QUIT): direct to Dovecot's POP3S
  through the relay vs through mailgate with a warm pool (the first poll through mailgate
  warms it and is not counted); medians of ``--polls`` polls each, interleaved.
* **10b** IMAP login (connect, TLS, login → tagged OK): direct XOAUTH2 through the relay vs
  LOGIN through mailgate (warm pool).
* **10c** upstream logins for a client that polls ``--polls`` times: counted in mailgate's own
  log (``logged in upstream as``), target 1.

The relay's delay is applied per chunk with a per-direction sender thread, so bytes keep their
order and a burst of chunks is delayed once, not once per chunk (like a long link, unlike a
slow one: bandwidth is not limited). Output: a small table and the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from statistics import median

from bench import seeding
from bench.gateway_proc import GatewayProcess, GatewayUser, authorize_users, free_port, write_config
from bench.labproc import LabProcess
from bench.wire import Credentials, Endpoint, POP3Client, client_context, imap_login

ROOT = Path(__file__).resolve().parent.parent
#: Messages in each polled mailbox (a household's INBOX kept small by POP3 deletion).
POLL_MESSAGES = 50
DIRECT_USER = "bench-wan-direct@example.com"
GATEWAY_UPSTREAM = "bench-wan-gw@example.com"
IMAP_DIRECT_USER = "bench-wan-imap@example.com"


class DelayRelay:
    """Accepts on a loopback port; each connection is relayed to ``target`` with every chunk
    held ``delay`` seconds in each direction."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = False

    def start(self) -> DelayRelay:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ended = threading.Semaphore(0)  # one release per direction that ended

            def close_both(a: socket.socket = client, b: socket.socket = upstream,
                           ended: threading.Semaphore = ended) -> None:
                ended.acquire()
                ended.acquire()
                a.close()
                b.close()

            self._pipe(client, upstream, ended)
            self._pipe(upstream, client, ended)
            threading.Thread(target=close_both, daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, ended: threading.Semaphore) -> None:
        queue: list[tuple[float, int, bytes]] = []
        ready = threading.Condition()
        counter = iter(range(1 << 62))

        def reader() -> None:
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                with ready:
                    heapq.heappush(queue, (time.monotonic() + self.delay, next(counter), data))
                    ready.notify()
                if not data:
                    return

        def writer() -> None:
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    due, _, data = queue[0]
                    wait = due - time.monotonic()
                    if wait > 0:
                        ready.wait(wait)
                        continue
                    heapq.heappop(queue)
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        ended.release()
                        return
                    dst.sendall(data)
                except OSError:
                    ended.release()
                    return

        threading.Thread(target=reader, daemon=True).start()
        threading.Thread(target=writer, daemon=True).start()


def _poll(connect: Callable[[], POP3Client], credentials: Credentials) -> float:
    start = time.perf_counter()
    session = connect()
    session.login(credentials)
    session.stat()
    session.multiline(b"UIDL")
    session.quit()
    return time.perf_counter() - start


def _imap_login(endpoint: Endpoint, ca: Path, credentials: Credentials) -> float:
    client, seconds = imap_login(endpoint, client_context(ca), credentials)
    client.logout()
    return seconds


def _upstream_logins(log: Path) -> int:
    try:
        return log.read_text(errors="replace").count("logged in upstream as")
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wan", description=__doc__)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay (ms)")
    parser.add_argument("--polls", type=int, default=10, help="polls (and logins) per side")
    args = parser.parse_args(argv)
    delay = args.delay_ms / 1000
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="mailgate-wan-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        lab = stack.enter_context(LabProcess(sys.executable, ROOT))
        assert lab.info is not None
        info = lab.info
        for user in (DIRECT_USER, GATEWAY_UPSTREAM):
            seeding.bulk_append(info, user, (seeding.small_message(n) for n in range(POLL_MESSAGES)))
        imaps = DelayRelay((info.host, info.ports["imaps"]), delay).start()
        pop3s = DelayRelay((info.host, info.ports["pop3s"]), delay).start()
        stack.callback(imaps.close)
        stack.callback(pop3s.close)
        wan_info = dataclasses.replace(info, host="127.0.0.1",
                                       ports={**info.ports, "imaps": imaps.port})
        user = GatewayUser("mg-wan", secrets.token_urlsafe(12), GATEWAY_UPSTREAM)
        ports = {"imap": free_port(), "pop3": free_port()}
        config = write_config(workdir, wan_info, [user], ports)
        authorize_users(sys.executable, ROOT, config, [user],
                        lambda upstream: lab.issue_tokens(upstream)[1])
        gateway = stack.enter_context(GatewayProcess(sys.executable, ROOT, config, ports.values()))

        direct_pop = Endpoint("127.0.0.1", pop3s.port, info.ca_file)
        gw_pop = Endpoint("127.0.0.1", ports["pop3"], gateway.ca_file)
        direct_ctx, gw_ctx = client_context(info.ca_file), client_context(gateway.ca_file)
        direct_creds = Credentials("login", DIRECT_USER, info.password)
        gw_creds = Credentials("login", user.name, user.password)
        # Warm-up: mailgate's password check, token and pool; Dovecot's caches.
        _poll(lambda: POP3Client.connect(gw_pop, gw_ctx), gw_creds)
        _poll(lambda: POP3Client.connect(direct_pop, direct_ctx), direct_creds)
        logins_before = _upstream_logins(gateway.log_path)
        direct_polls, gw_polls = [], []
        for _ in range(args.polls):
            direct_polls.append(_poll(lambda: POP3Client.connect(direct_pop, direct_ctx), direct_creds))
            gw_polls.append(_poll(lambda: POP3Client.connect(gw_pop, gw_ctx), gw_creds))
        time.sleep(0.5)
        logins = _upstream_logins(gateway.log_path) - logins_before

        token = lab.issue_tokens(IMAP_DIRECT_USER)[0]
        direct_imap = Endpoint("127.0.0.1", imaps.port, info.ca_file)
        gw_imap = Endpoint("127.0.0.1", ports["imap"], gateway.ca_file)
        direct_logins, gw_logins = [], []
        _imap_login(gw_imap, gateway.ca_file, gw_creds)
        for _ in range(args.polls):
            direct_logins.append(_imap_login(direct_imap, info.ca_file,
                                             Credentials("xoauth2", IMAP_DIRECT_USER, token)))
            gw_logins.append(_imap_login(gw_imap, gateway.ca_file, gw_creds))

    def ms(values: list[float]) -> str:
        return f"{median(values) * 1000:.1f} ms"

    pop_ratio = median(direct_polls) / median(gw_polls)
    print(f"WAN figure: one-way delay {args.delay_ms:g} ms (RTT {2 * args.delay_ms:g} ms), "
          f"{args.polls} samples each, medians")
    print(f"10a POP3 poll (connect+TLS+login+STAT+UIDL+QUIT, {POLL_MESSAGES} messages): "
          f"direct {ms(direct_polls)}, mailgate {ms(gw_polls)} -> mailgate {pop_ratio:.1f}x "
          "faster (target >= 3x)")
    print(f"10b IMAP login (connect+TLS+login): direct {ms(direct_logins)}, "
          f"mailgate {ms(gw_logins)}")
    print(f"10c upstream logins for {args.polls} polls through mailgate: {logins} (target 1; "
          "0 = all served by the connection pooled at warm-up)")
    load_after = os.getloadavg()
    print("load average before: " + " ".join(f"{v:.2f}" for v in load_before)
          + ", after: " + " ".join(f"{v:.2f}" for v in load_after)
          + f" on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
