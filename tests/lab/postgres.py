"""A private, real PostgreSQL on loopback, for the PostgreSQL credential store's tests.

Theory of operation
-------------------
:class:`LabPostgres` makes a fresh temporary directory, runs Debian's ``initdb`` there (trust
authentication, superuser ``mailgate``) and starts the server with ``pg_ctl`` on a free
127.0.0.1 port, its socket in the same directory, ``fsync`` off (a test cluster). PostgreSQL
refuses to run as root, so under root every command runs as ``nobody`` (``runuser``) and the
directory is handed to that user; the system's PostgreSQL service is never touched.

:meth:`LabPostgres.new_database` creates an empty database and returns its URL: each test gets
its own. :meth:`restart` stops (fast mode: every client connection is cut) and starts the
server again on the same port, for the "PostgreSQL restarted under load" test;
:meth:`stop`/:meth:`start` do each half. :meth:`close` stops it and removes the directory.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["LabPostgres", "POSTGRES_INSTALL_HINT", "postgres_bin"]

POSTGRES_INSTALL_HINT = "apt-get install postgresql"
SUPERUSER = "mailgate"
_counter = itertools.count(1)


def postgres_bin() -> Path | None:
    """The directory of Debian's PostgreSQL server binaries (the newest), if installed."""
    base = Path("/usr/lib/postgresql")
    found = sorted((p / "bin" for p in base.glob("*") if (p / "bin" / "initdb").exists()),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LabPostgres:
    def __init__(self) -> None:
        bindir = postgres_bin()
        if bindir is None:
            raise RuntimeError(f"PostgreSQL is not installed ({POSTGRES_INSTALL_HINT})")
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="mailgate-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            self._as_user = ["runuser", "-u", "nobody", "--"]
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "-E", "UTF8", "--no-sync", "--no-instructions")
        self.running = False
        atexit.register(self.close)

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self._as_user, str(self.bindir / tool), *args], cwd=self.dir,
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed: {result.stdout}{result.stderr}\n{self.log_text()}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=300 -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "postgres.log"),
                  "-o", options, "-w", "-t", "30", "start")
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
            self.running = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh empty database; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(_counter)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_text(self) -> str:
        try:
            return (self.dir / "postgres.log").read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        try:
            self.stop()
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
