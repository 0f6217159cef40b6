"""``[server] workers = 2``: the real ``mailgate serve`` as a supervisor with two worker
processes (gateway/workers.py), against the lab."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from gateway.config import parse_config
from tests.fixtures.gateway import lab_provider
from tests.fixtures.imap import PASSWORD, USER, Wire, quoted, seed_account
from tests.fixtures.pop3 import PopWire
from tests.lab import LabDovecot, LabOAuthServer, seed
from tests.lab.corpus import big_message

BOOT_TIMEOUT = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _toml(value: object) -> str:
    return json.dumps(value)  # strings, numbers, lists: JSON and TOML agree


@dataclass
class Supervisor:
    process: subprocess.Popen[bytes]
    log: Path
    imap: int
    pop3: int
    admin: int
    state_dir: Path

    def workers(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_workers(self, count: int, timeout: float = BOOT_TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            pids = self.workers()
            if len(pids) == count and all(self.listening(pid) for pid in pids):
                return pids
            assert time.monotonic() < deadline, f"workers {pids}: {self.log_text()[-3000:]}"
            time.sleep(0.05)

    def established(self) -> dict[int, int]:
        """Established client connections on the IMAP port, per worker pid."""
        out = subprocess.run(["ss", "-tnpH", "state", "established", f"sport = :{self.imap}"],
                             capture_output=True, text=True).stdout
        counts = {pid: 0 for pid in self.workers()}
        for pid in counts:
            counts[pid] = out.count(f"pid={pid},")
        return counts

    def listening(self, pid: int) -> bool:
        """Whether process ``pid`` has its own listening socket on the IMAP port."""
        out = subprocess.run(["ss", "-ltnpH", f"sport = :{self.imap}"], capture_output=True,
                             text=True).stdout
        return f"pid={pid}," in out


@pytest.fixture
def supervisor(tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
               lab_user: str) -> Iterator[Supervisor]:
    imap, pop3, admin = _free_port(), _free_port(), _free_port()
    provider = lab_provider(lab, oauth_server)
    lines = ["[server]", 'hostname = "localhost"', 'state_dir = "state"', "workers = 2",
             "[admin]", f'bind = "127.0.0.1:{admin}"',
             "[limits]", "auth_failure_delay = 0", "token_request_timeout = 5",
             "shutdown_grace = 2", "upstream_connections_per_account = 40",
             "worker_report_interval = 0.5",
             "[[listener]]", 'protocol = "imap"', f'bind = "127.0.0.1:{imap}"', 'tls = "none"',
             'plaintext_auth_from = ["127.0.0.0/8"]',
             "[[listener]]", 'protocol = "pop3"', f'bind = "127.0.0.1:{pop3}"', 'tls = "none"',
             'plaintext_auth_from = ["127.0.0.0/8"]',
             "[providers.lab]", *[f"{k} = {_toml(v)}" for k, v in provider.items()],
             f"[users.{USER}]", 'provider = "lab"', f"upstream_user = {_toml(lab_user)}"]
    path = tmp_path / "mailgate.toml"
    path.write_text("\n".join(lines) + "\n")
    config = parse_config(__import__("tomllib").loads(path.read_text()), base_dir=tmp_path,
                          path=path)
    _, refresh_token = oauth_server.issue_tokens(lab_user)
    trio.run(seed_account, config, refresh_token)
    log = tmp_path / "mailgate.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(path),
                                    "serve"], stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sup = Supervisor(process, log, imap, pop3, admin, config.server.state_dir)
    try:
        sup.wait_workers(2)
        yield sup
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                for pid in sup.workers():
                    os.kill(pid, signal.SIGKILL)
                process.kill()
                process.wait()


async def imap_login(port: int) -> bytes:
    wire = Wire(await trio.open_tcp_stream("127.0.0.1", port), None)  # type: ignore[arg-type]
    try:
        assert (await wire.line()).startswith(b"* OK")
        answer = (await wire.command(b"a1 LOGIN " + quoted(USER) + b" " + quoted(PASSWORD)))[-1]
        if answer.startswith(b"a1 OK"):
            await wire.command(b"a2 LOGOUT")
        return answer
    finally:
        await wire.aclose()


async def pop3_session(port: int) -> tuple[PopWire, bytes]:
    wire = PopWire(await trio.open_tcp_stream("127.0.0.1", port), None)  # type: ignore[arg-type]
    greeting = await wire.line()
    if not greeting.startswith(b"+OK"):  # e.g. queued at a worker that was just killed
        return wire, b"greeting: " + greeting
    assert (await wire.command(f"USER {USER}")).startswith(b"+OK")
    return wire, await wire.command(f"PASS {PASSWORD}")


def flock_holder(path: Path) -> int | None:
    """The pid holding an flock on ``path`` (from /proc/locks)."""
    inode = path.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and fields[-3 if fields[-1] == "EOF" else -2].endswith(f":{inode}"):
            return int(fields[4])
    return None


async def test_two_workers_share_listeners_and_refresh_once(
        supervisor: Supervisor, oauth_server: LabOAuthServer) -> None:
    workers = supervisor.workers()
    assert len(workers) == 2 and all(supervisor.listening(pid) for pid in workers)
    oauth_server.rotate_refresh_tokens = True
    start = len(oauth_server.token_requests)
    answers: list[bytes] = []

    async def one() -> None:
        answers.append(await imap_login(supervisor.imap))

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for _ in range(24):
                nursery.start_soon(one)
    assert all(a.startswith(b"a1 OK") for a in answers), answers
    requests = oauth_server.token_requests[start:]
    assert [(r["grant_type"], r["error"]) for r in requests] == [("refresh_token", None)]
    # Both workers logged the user in (each logs its own derivation-backed login).
    text = supervisor.log_text()
    assert text.count("alice logged in") >= 24


async def test_pop3_lock_is_exclusive_across_workers_and_dies_with_its_holder(
        supervisor: Supervisor, lab: LabDovecot, lab_user: str) -> None:
    await trio.to_thread.run_sync(lambda: seed.append(lab, lab_user, big_message(2_000_000)))
    first, answer = await pop3_session(supervisor.pop3)
    assert answer.startswith(b"+OK"), answer
    for _ in range(4):  # whichever worker the kernel picks, the maildrop is in use
        second, refused = await pop3_session(supervisor.pop3)
        assert refused.startswith(b"-ERR [IN-USE]"), refused
        await second.aclose()
    assert (await first.command("RETR 1")).startswith(b"+OK")
    await first.exactly(100_000)  # mid-RETR
    lock = supervisor.state_dir / "pop3" / f"{USER}.lock"
    holder = flock_holder(lock)
    assert holder in supervisor.workers()
    os.kill(holder, signal.SIGKILL)
    await first.aclose()
    with trio.fail_after(20):
        while True:  # the kernel released the lock with the process
            again, answer = await pop3_session(supervisor.pop3)
            if answer.startswith(b"+OK"):
                break
            await again.aclose()
            await trio.sleep(0.1)
    assert (await again.command("STAT")).startswith(b"+OK 1 ")  # nothing was deleted
    await again.command("QUIT")
    await again.aclose()
    # The supervisor started the killed worker again.
    await trio.to_thread.run_sync(supervisor.wait_workers, 2)
    assert holder not in supervisor.workers()
    assert "died (signal 9); starting it again" in supervisor.log_text()


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (/proc's SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


async def test_sighup_and_sigterm_reach_every_worker(supervisor: Supervisor) -> None:
    workers = supervisor.workers()
    with trio.fail_after(10):  # each worker's gateway is listening for signals
        while not all(catches(pid, signal.SIGHUP) for pid in workers):
            await trio.sleep(0.05)
    supervisor.process.send_signal(signal.SIGHUP)
    with trio.fail_after(10):
        while supervisor.log_text().count("SIGHUP: configuration reloaded") < 2:
            await trio.sleep(0.05)
    assert supervisor.workers() == workers  # reloaded, not restarted
    assert (await imap_login(supervisor.imap)).startswith(b"a1 OK")
    supervisor.process.send_signal(signal.SIGTERM)
    code = await trio.to_thread.run_sync(supervisor.process.wait, 20)
    assert code == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text().lower()
    assert supervisor.log_text().count("SIGTERM: shutting down") == 2


async def test_one_admin_port_shows_the_sessions_and_counters_of_both_workers(
        supervisor: Supervisor) -> None:
    wires: list[Wire] = []
    try:
        with trio.fail_after(60):  # logged-in sessions until the kernel gave each worker some
            while len(wires) < 4 or min(supervisor.established().values()) == 0:
                assert len(wires) < 40, supervisor.established()
                stream = await trio.open_tcp_stream("127.0.0.1", supervisor.imap)
                wire = Wire(stream, None)  # type: ignore[arg-type]
                wires.append(wire)
                assert (await wire.line()).startswith(b"* OK")
                answer = await wire.command(b"a1 LOGIN " + quoted(USER) + b" " + quoted(PASSWORD))
                assert answer[-1].startswith(b"a1 OK"), answer
        per_pid = supervisor.established()
        assert sum(per_pid.values()) == len(wires) and min(per_pid.values()) > 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{supervisor.admin}") as http:
            with trio.fail_after(15):  # the other worker's next report (every 0.5 s)
                while True:
                    status = (await http.get("/api/status")).json()
                    if len(status["sessions"]) == len(wires) and all(
                            s["user"] == USER and s["state"] == "authenticated"
                            for s in status["sessions"]):
                        break
                    await trio.sleep(0.1)
            assert status["gateway"]["workers"] == 2
            by_worker = sorted(sum(1 for s in status["sessions"] if s["worker"] == w)
                               for w in (0, 1))
            assert by_worker == sorted(per_pid.values())
            page = (await http.get("/")).text
            table = page.split('<table id="sessions">')[1].split("</table>")[0]
            assert "<th>worker</th>" in table and table.count(f"<td>{USER}</td>") == len(wires)
            metrics = (await http.get("/metrics")).text
        samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                       if line and not line.startswith("#"))
        assert samples['mailgate_sessions{protocol="imap"}'] == str(len(wires))
        assert sorted(int(samples[f'mailgate_worker_sessions{{worker="{w}"}}'])
                      for w in (0, 1)) == sorted(per_pid.values())
        # Counters are summed over both workers: every login and accepted connection.
        assert int(samples['mailgate_logins_total{protocol="imap",result="ok"}']) == len(wires)
        assert int(samples['mailgate_sessions_opened_total{protocol="imap"}']) == len(wires)
    finally:
        for wire in wires:
            await wire.aclose()
    # Each worker other than 0 reports in a file of its own, removed when it exits cleanly.
    report = supervisor.state_dir / "workers" / "1.json"
    assert report.exists() and not (supervisor.state_dir / "workers" / "0.json").exists()
    supervisor.process.send_signal(signal.SIGTERM)
    assert await trio.to_thread.run_sync(supervisor.process.wait, 20) == 0
    assert not report.exists()
