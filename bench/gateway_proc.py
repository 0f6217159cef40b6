"""mailgate as a separate process, configured against the lab, with its accounts authorized.

Theory of operation
-------------------
For honest numbers mailgate runs as its own process (``python -m gateway --config X serve``),
so the benchmark's clients never share its interpreter, and its memory and CPU can be read from
``/proc/PID``. :func:`write_config` writes a config whose one provider is the lab (its OAuth
server, its Dovecot IMAPS port and CA) with the given users and raised connection limits (a
benchmark opens 1,000 sessions from one address, which the defaults rightly refuse).

:func:`authorize_users` seeds every account the way an admin does with
``mailgate authorize USER --refresh-token-stdin --password-stdin`` (the local password, then a
refresh token from the lab): the CLI's own function, called for every user by one helper
process.

:class:`GatewayProcess` starts ``serve`` (stderr to a log file), waits until every listener
accepts a connection, and on exit sends SIGTERM and waits (SIGKILL after a grace).

A listener is only configured for a front end that imports: the server refuses to start when
one is missing, and the benchmark reports that front end's figures as ``n/a`` instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from bench.labproc import LabInfo

__all__ = ["GatewayUser", "write_config", "authorize_users", "GatewayProcess",
           "missing_frontends", "free_port", "accepts", "file_tail"]

#: How long ``serve`` may take until every listener accepts connections.
START_TIMEOUT = 30.0
#: SIGTERM grace before SIGKILL when stopping (its sessions are all closed by then).
STOP_TIMEOUT = 10.0
#: One ``mailgate authorize`` (process start, password hash, token request).
AUTHORIZE_TIMEOUT = 60.0
#: Poll step while waiting for a listener.
POLL_INTERVAL = 0.05
#: Limits written into the benchmark's config: high enough for 1,000 sessions from loopback.
BENCH_LIMITS = {
    "max_connections": 5000,
    "max_connections_per_ip": 5000,
    "upstream_connections_per_account": 1000,
    "shutdown_grace": 2,  # the benchmark closes every session before it stops mailgate
    "smtp_upstream_connections_per_account": 1000,
    "smtp_messages_per_user_per_hour": 1000000,
}
FRONTEND_MODULES = {
    "imap": "gateway.frontends.imap_session",
    "pop3": "gateway.frontends.pop3_session",
    "smtp": "gateway.frontends.smtp_session",
}


@dataclass(frozen=True)
class GatewayUser:
    """A ``[users.NAME]`` entry: its local password and the lab mailbox it maps to."""

    name: str
    password: str
    upstream_user: str

    def __repr__(self) -> str:
        return f"GatewayUser({self.name!r}, ***, {self.upstream_user!r})"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def missing_frontends(python: str, cwd: Path) -> dict[str, str]:
    """``{protocol: reason}`` for every front end whose module does not import."""
    missing = {}
    for protocol, module in FRONTEND_MODULES.items():
        done = subprocess.run(
            [python, "-c", f"import {module}"], cwd=cwd, capture_output=True, text=True,
            timeout=60,
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["import failed"])[-1]
            missing[protocol] = f"{module} does not import: {last[:120]}"
    return missing


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_config(directory: Path, lab: LabInfo, users: Iterable[GatewayUser],
                 ports: dict[str, int]) -> Path:
    """Write ``directory/mailgate.toml``; ``ports`` maps ``"imap"``/``"pop3"``/``"smtp"`` to the port of
    an implicit-TLS listener (a protocol left out gets no listener)."""
    lines = [
        "[server]",
        'state_dir = "state"',
        'hostname = "localhost"',
        "[tls]",
        'cert_file = "certs/mailgate.pem"',
        'key_file = "certs/mailgate.key"',
        "[logging]",
        'level = "info"',
        "[admin]",
        "enabled = false",
    ]
    for protocol, port in sorted(ports.items()):
        lines += ["[[listener]]", f'protocol = "{protocol}"', f'bind = "127.0.0.1:{port}"',
                  'tls = "implicit"']
    lines += [
        "[providers.lab]",
        f'imap = "{lab.host}:{lab.ports["imaps"]}"',
        'imap_tls = "implicit"',
        f"ca_file = {_toml_string(str(lab.ca_file))}",
        'sasl = "xoauth2"',
        *([f'smtp = "{lab.host}:{lab.ports["submissions"]}"', 'smtp_tls = "implicit"']
          if "submissions" in lab.ports else []),
        'flow = "authorization_code"',
        f"authorize_url = {_toml_string(lab.authorize_url)}",
        f"token_url = {_toml_string(lab.token_url)}",
        'scopes = ["mail"]',
        f"client_id = {_toml_string(lab.client_id)}",
        f"client_secret = {_toml_string(lab.client_secret)}",
    ]
    for user in users:
        lines += [f"[users.{user.name}]", 'provider = "lab"',
                  f"upstream_user = {_toml_string(user.upstream_user)}"]
    lines.append("[limits]")
    lines += [f"{key} = {value}" for key, value in BENCH_LIMITS.items()]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "mailgate.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def authorize_users(python: str, cwd: Path, config: Path, users: Iterable[GatewayUser],
                    refresh_token: Callable[[str], str]) -> None:
    """Authorize every user as ``mailgate authorize NAME --refresh-token-stdin
    --password-stdin`` does; ``refresh_token(upstream_user)`` issues the token to import.

    One helper process (``python -m bench.gateway_proc --authorize CONFIG``) runs the CLI's own
    function for every user in turn: starting the CLI once per user would cost a second of
    interpreter start-up each."""
    requests = [{"name": u.name, "password": u.password,
                 "refresh_token": refresh_token(u.upstream_user)} for u in users]
    done = subprocess.run(
        [python, "-m", "bench.gateway_proc", "--authorize", str(config)],
        input="".join(json.dumps(r) + "\n" for r in requests), cwd=cwd, capture_output=True,
        text=True, timeout=AUTHORIZE_TIMEOUT * max(1, len(requests)),
    )
    if done.returncode != 0:
        raise RuntimeError(f"mailgate authorize failed ({done.returncode}): "
                           f"{(done.stdout + done.stderr).strip()[-400:]}")


def _authorize_main(config_path: str) -> int:
    """Body of ``--authorize``: one JSON request per stdin line, each given to the function
    behind ``mailgate authorize USER --refresh-token-stdin --password-stdin``."""
    import io

    import trio

    from gateway.config import load_config
    from gateway.oauth.commands import authorize_async

    config = load_config(config_path)
    requests = [json.loads(line) for line in sys.stdin if line.strip()]

    async def run() -> int:
        for request in requests:
            answer = io.StringIO()
            status = await authorize_async(
                config, request["name"], refresh_token_stdin=True, password_stdin=True,
                stdin=io.StringIO(f"{request['password']}\n{request['refresh_token']}\n"),
                stdout=answer,
            )
            if status != 0:
                print(f"{request['name']}: {answer.getvalue().strip()}", file=sys.stderr)
                return status
        return 0

    return trio.run(run)


class GatewayProcess:
    """``python -m gateway --config CONFIG serve`` as a child process; a context manager."""

    def __init__(self, python: str, cwd: Path, config: Path, ports: Iterable[int]) -> None:
        self._python = python
        self._cwd = cwd
        self.config = config
        self.ports = list(ports)
        self.log_path = config.parent / "mailgate.log"
        self.ca_file = config.parent / "certs" / "mailgate-ca.pem"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("mailgate is not running")
        return self._proc.pid

    def start(self) -> GatewayProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        try:
            self._proc = subprocess.Popen(
                [self._python, "-m", "gateway", "--config", str(self.config), "serve"],
                cwd=self._cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        pending = set(self.ports)
        while pending:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mailgate exited with {self._proc.returncode}: "
                                   f"{self.log_tail()}")
            pending = {p for p in pending if not accepts(p)}
            if pending and time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mailgate never listened on {sorted(pending)}")
            if pending:
                time.sleep(POLL_INTERVAL)
        return self

    def log_tail(self, chars: int = 600) -> str:
        return file_tail(self.log_path, chars)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def file_tail(path: Path, chars: int) -> str:
    """The last ``chars`` characters of a log file ("" if it cannot be read)."""
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--authorize":
        sys.exit(_authorize_main(sys.argv[2]))
    sys.exit("run the benchmark with: python -m bench")
