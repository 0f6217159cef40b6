"""A private, real HTTP proxy (Debian's ``tinyproxy``) on loopback, for the outbound-proxy tests.

Theory of operation
-------------------
:class:`LabProxy` writes a ``tinyproxy.conf`` into a fresh temporary directory and runs
``tinyproxy -d -c FILE`` (foreground) on a free 127.0.0.1 port; :meth:`LabProxy.start` returns
once the port accepts connections, :meth:`LabProxy.stop` terminates the process and removes the
directory. The proxy forwards plain HTTP requests (the lab OAuth server is ``http://``) and opens
``CONNECT`` tunnels (to the lab Dovecot), as a corporate proxy does.

Three flavours, chosen by the constructor's arguments:

* open: ``Allow 127.0.0.1``, CONNECT to any port;
* ``credentials=("user", "pass")``: ``BasicAuth`` -- a request without them gets ``407``;
* ``refuse=True``: the client is not in any ``Allow`` rule (every request gets ``403``) and
  ``ConnectPort 1`` (no tunnel to a real port either).

:meth:`LabProxy.log_text` is tinyproxy's own log (what it forwarded and refused), so a test can
check that traffic really went through the proxy.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["LabProxy", "TINYPROXY_HINT"]

TINYPROXY_HINT = "apt-get install tinyproxy"
START_TIMEOUT = 10.0
POLL_INTERVAL = 0.02


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LabProxy:
    def __init__(self, *, credentials: tuple[str, str] | None = None, refuse: bool = False):
        self.credentials = credentials
        self.refuse = refuse
        self.port = 0
        self.dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (with the credentials when the proxy needs them)."""
        if self.credentials:
            user, password = self.credentials
            return f"http://{user}:{password}@127.0.0.1:{self.port}"
        return self.bare_url

    @property
    def bare_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _conf(self) -> str:
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            "LogLevel Info",
            f'LogFile "{self.dir}/tinyproxy.log"',
            "MaxClients 100",
            "DisableViaHeader Yes",
        ]
        if self.refuse:
            lines += ["Allow 192.0.2.1", "ConnectPort 1"]
        else:
            lines += ["Allow 127.0.0.1"]
        if self.credentials:
            lines.append(f"BasicAuth {self.credentials[0]} {self.credentials[1]}")
        return "\n".join(lines) + "\n"

    def start(self) -> "LabProxy":
        binary = shutil.which("tinyproxy", path="/usr/bin:/usr/sbin:/bin:/sbin")
        if binary is None:
            raise RuntimeError(f"tinyproxy is not installed; the proxy tests need it: {TINYPROXY_HINT}")
        self.dir = Path(tempfile.mkdtemp(prefix="mailgate-tinyproxy-"))
        self.dir.chmod(0o777)  # tinyproxy may drop to another user to write its log
        self.port = _free_port()
        conf = self.dir / "tinyproxy.conf"
        conf.write_text(self._conf())
        self._proc = subprocess.Popen(
            [binary, "-d", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tinyproxy exited at start: {self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(POLL_INTERVAL)
        self.stop()
        raise RuntimeError("tinyproxy did not start listening in time")

    def log_text(self) -> str:
        try:
            return (self.dir / "tinyproxy.log").read_text(errors="replace") if self.dir else ""
        except OSError:
            return ""

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "LabProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
