"""The test lab (real Dovecot + local OAuth server) in its own process, driven over stdin.

Theory of operation
-------------------
The lab's OAuth server is a Python HTTP server in a thread: Dovecot asks it to introspect the
token of every XOAUTH2 login. Run inside the benchmark's own process it would compete with the
benchmark's clients for the interpreter lock and skew every login figure, so
:class:`LabProcess` runs ``python -m bench.labproc`` as a child process, which starts
:class:`tests.lab.LabOAuthServer` and :class:`tests.lab.LabDovecot` (reused as they are) and
then answers one JSON request per stdin line with one JSON line on stdout:

* on start, unprompted: ``{"ports": {...}, "host": ..., "password": ..., "ca_file": ...,
  "token_url": ..., "authorize_url": ..., "client_id": ..., "client_secret": ...,
  "dovecot_pid": ...}``
* ``{"op": "issue", "user": U}`` -> ``{"access": ..., "refresh": ...}`` (tokens for U)
* ``{"op": "stop"}`` or end of stdin -> the lab stops and the process exits.

Tokens travel only over this private pipe; they are never printed to the terminal or logged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LabInfo", "LabProcess"]

#: How long the lab process may take to start Dovecot and report its ports.
START_TIMEOUT = 30.0
#: How long ``stop()`` waits for the lab process to exit before killing it.
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class LabInfo:
    """Where the lab listens. Matches :class:`tests.lab.seed.LabEndpoint`."""

    host: str
    ports: dict[str, int]
    password: str
    ca_file: Path
    token_url: str
    authorize_url: str
    client_id: str
    client_secret: str
    dovecot_pid: int


class LabProcess:
    """A running ``python -m bench.labproc`` child; a context manager."""

    def __init__(self, python: str = sys.executable, cwd: Path | None = None) -> None:
        self._python = python
        self._cwd = cwd
        self._proc: subprocess.Popen[str] | None = None
        self.info: LabInfo | None = None

    def start(self) -> LabInfo:
        self._proc = subprocess.Popen(
            [self._python, "-m", "bench.labproc"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=self._cwd,
        )
        hello = self._read()
        hello["ca_file"] = Path(hello["ca_file"])
        self.info = LabInfo(**hello)
        return self.info

    def _read(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the lab process ended (exit code {self._proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"lab: {answer['error']}")
        return answer

    def request(self, **payload: Any) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(payload) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def issue_tokens(self, user: str) -> tuple[str, str]:
        """A fresh ``(access_token, refresh_token)`` for ``user``."""
        answer = self.request(op="issue", user=user)
        return answer["access"], answer["refresh"]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> LabProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _serve() -> int:
    from tests.lab import LabDovecot, LabOAuthServer

    def reply(payload: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()

    with LabOAuthServer() as oauth, LabDovecot(oauth) as dovecot:
        master_pid = dovecot.dir / "run" / "master.pid"  # base_dir of the lab instance
        reply({
            "host": dovecot.host,
            "ports": dovecot.ports,
            "password": dovecot.password,
            "ca_file": str(dovecot.ca_file),
            "token_url": oauth.token_url,
            "authorize_url": oauth.authorize_url,
            "client_id": oauth.client_id,
            "client_secret": oauth.client_secret or "",
            "dovecot_pid": int(master_pid.read_text()) if master_pid.exists() else 0,
        })
        for line in sys.stdin:
            request = json.loads(line)
            op = request.get("op")
            if op == "stop":
                break
            if op == "issue":
                access, refresh = oauth.issue_tokens(request["user"])
                reply({"access": access, "refresh": refresh})
            else:
                reply({"error": f"unknown op {op!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
