"""A private, real HAProxy on loopback, in TCP mode in front of one or more mailgate listeners.

Theory of operation
-------------------
:class:`LabHAProxy` writes a configuration into a fresh temporary directory and runs
``haproxy -db -f DIR/haproxy.cfg`` (foreground, no daemon, no system service) as a child
process. Each :class:`Frontend` is one ``bind`` on a free 127.0.0.1 port with a backend of
mailgate addresses; ``send_proxy`` chooses ``send-proxy-v2`` (2), ``send-proxy`` (1) or no
header (0). With ``health_ports``, every server is health-checked with ``GET /healthz`` on its
admin port (the configuration docs/operations.md shows). :meth:`start` returns once every
frontend accepts connections; :meth:`stop` terminates the process and removes the directory.

:func:`haproxy_config` is the text written, so the documented configuration and the tested one
are the same function.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Frontend", "LabHAProxy", "haproxy_config", "HAPROXY_INSTALL_HINT"]

HAPROXY_INSTALL_HINT = "apt-get install haproxy"
START_TIMEOUT = 10.0


@dataclass
class Frontend:
    name: str
    servers: list[tuple[str, int]]  # mailgate listener addresses
    send_proxy: int = 2
    health_ports: list[int] = field(default_factory=list)  # admin ports, one per server
    port: int = 0  # assigned by start()
    bind_host: str = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def haproxy_config(frontends: list[Frontend], *, check_interval: str = "1s") -> str:
    lines = [
        "global",
        "    maxconn 4000",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 30m",  # IMAP IDLE: at least mailgate's imap_idle_timeout
        "    timeout server 30m",
        "    timeout check 2s",
        "    retries 3",
        "    option redispatch",  # a refused connect is retried on another server
    ]
    for fe in frontends:
        lines += [
            f"frontend {fe.name}",
            f"    bind {fe.bind_host}:{fe.port}",
            f"    default_backend {fe.name}_gateways",
            f"backend {fe.name}_gateways",
            "    balance roundrobin",
        ]
        if fe.health_ports:
            lines += ["    option httpchk",
                      "    http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host localhost",
                      "    http-check expect status 200"]
        proxy = {2: " send-proxy-v2", 1: " send-proxy", 0: ""}[fe.send_proxy]
        for i, (host, port) in enumerate(fe.servers):
            check = (f" check port {fe.health_ports[i]} inter {check_interval} fall 1 rise 1"
                     if fe.health_ports else "")
            lines.append(f"    server gw{i + 1} {host}:{port}{proxy}{check}")
    return "\n".join(lines) + "\n"


class LabHAProxy:
    def __init__(self, frontends: list[Frontend]):
        self.frontends = {fe.name: fe for fe in frontends}
        self.dir = Path(tempfile.mkdtemp(prefix="mailgate-haproxy-"))
        self.process: subprocess.Popen[bytes] | None = None

    def address(self, name: str) -> tuple[str, int]:
        return ("127.0.0.1", self.frontends[name].port)

    def start(self) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            raise RuntimeError(f"HAProxy is not installed ({HAPROXY_INSTALL_HINT})")
        for fe in self.frontends.values():
            fe.port = fe.port or _free_port()
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(haproxy_config(list(self.frontends.values())))
        log = open(self.dir / "haproxy.log", "wb")
        self.process = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        for fe in self.frontends.values():
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"haproxy exited: {self.log_text()}")
                try:
                    socket.create_connection(("127.0.0.1", fe.port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"haproxy did not start: {self.log_text()}") from None
                    time.sleep(0.02)

    def log_text(self) -> str:
        try:
            return (self.dir / "haproxy.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
