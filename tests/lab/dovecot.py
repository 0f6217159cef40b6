"""A private, real Dovecot 2.3 instance on loopback, as the upstream IMAP server of the tests.

Theory of operation
-------------------
:class:`LabDovecot` writes a self-contained configuration into a fresh temporary directory
(``base_dir``, ``state_dir``, logs, TLS files, mail all live below it, ``instance_name`` is
unique) and runs ``dovecot -F -c DIR/dovecot.conf`` as a child process on six free
127.0.0.1 ports: ``imap`` (STARTTLS offered), ``imaps``, ``pop3`` (STLS offered),
``pop3s``, ``submission`` (SMTP submission, STARTTLS offered) and ``submissions`` (implicit
TLS). :meth:`LabDovecot.start` returns once every port accepts connections (tens of
milliseconds); :meth:`LabDovecot.stop` terminates the master, which takes its children with
it, then waits until no process of the instance is left and removes the directory.

Authentication:

* an ``oauth2`` passdb for SASL ``XOAUTH2`` and ``OAUTHBEARER`` that introspects every token
  (RFC 7662, ``introspection_mode = post``) at the :class:`~tests.lab.oauth_server.LabOAuthServer`;
  ``auth_cache_size = 0`` so a revoked or expired token fails at once;
* a ``static`` passdb with the shared password :attr:`LabDovecot.password` for ``PLAIN`` and
  ``LOGIN`` (IMAP ``LOGIN``, POP3 ``USER``/``PASS``), so tests can reach a mailbox directly and
  compare mailgate's answers with Dovecot's own.

A ``static`` userdb with ``allow_all_users = yes`` makes every user name valid: each test
takes a fresh mailbox from :meth:`LabDovecot.new_user`. Mail is maildir under
``DIR/mail/<user>``, owned by ``nobody``. The inbox namespace has special-use ``Trash``,
``Sent``, ``Drafts`` and ``Junk`` mailboxes (auto-subscribed). Failure delays and the per-IP
auth penalty are off, and connection limits are raised, so failure and load tests are fast.

Submission: Dovecot's submission service authenticates with the same passdbs (so XOAUTH2 and
OAUTHBEARER tokens are introspected like IMAP's) and relays every accepted message to
:attr:`LabDovecot.sink`, a :class:`~tests.lab.smtp_sink.LabSmtpSink` that stores it (files under
``DIR/sink``). Dovecot adds its own ``Received:`` trace header on top of each relayed message.

TLS uses a throw-away ``trustme`` CA; :attr:`LabDovecot.ca_file` is its PEM, the server
certificate names ``localhost`` and ``127.0.0.1``.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trustme

from tests.lab.smtp_sink import LabSmtpSink

if TYPE_CHECKING:
    from tests.lab.oauth_server import LabOAuthServer

__all__ = ["LabDovecot", "DovecotNotInstalled", "INSTALL_HINT"]

#: What to run when the Dovecot binaries are missing.
INSTALL_HINT = "apt-get install dovecot-imapd dovecot-pop3d dovecot-submissiond"
#: Password of every user for PLAIN/LOGIN (the static passdb).
LAB_PASSWORD = "labpass"
#: Names of the listeners; ``LabDovecot.ports`` has one entry per name.
LISTENERS = ("imap", "imaps", "pop3", "pop3s", "submission", "submissions")
#: How long ``start()`` waits for every port to accept connections.
START_TIMEOUT = 10.0
#: How long ``stop()`` lets Dovecot shut down after SIGTERM before it sends SIGKILL.
STOP_GRACE = 0.5
#: How long ``stop()`` waits for processes to vanish after SIGKILL.
STOP_TIMEOUT = 5.0
#: How many times ``start()`` retries when a picked port was taken meanwhile.
START_ATTEMPTS = 3
#: Per-user/per-IP connection limit (Dovecot's default of 10 is too low for load tests).
MAX_USERIP_CONNECTIONS = 1000
#: Process and client limits of every Dovecot service.
PROCESS_LIMIT = 1000
CLIENT_LIMIT = 5000
#: Timeout of one introspection request from Dovecot to the lab OAuth server.
INTROSPECTION_TIMEOUT_MS = 5000
#: Timeout of one readiness probe of a port.
PROBE_TIMEOUT = 1.0
#: ``doveadm`` exit status for "no users kicked" (sysexits EX_NOUSER).
DOVEADM_EX_NOUSER = 68
#: Poll step while waiting for ports / processes.
POLL_INTERVAL = 0.01
#: Unprivileged owner of the mail (only used when running as root).
MAIL_OWNER = "nobody"

_instance_counter = itertools.count(1)
_user_counter = itertools.count(1)


class DovecotNotInstalled(RuntimeError):
    """The ``dovecot`` binary is missing; the message says how to install it."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_ready(host: str, port: int, *, expect_greeting: bool) -> bool:
    """Whether ``port`` accepts connections (and, for cleartext ports, sends its greeting:
    the login process is then fully up, which also makes an immediate ``stop()`` fast)."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as sock:
            if expect_greeting:
                sock.settimeout(PROBE_TIMEOUT)
                return sock.recv(64).startswith((b"* OK", b"+OK", b"220 "))
            return True
    except OSError:
        return False


def _live_group_members(group: int) -> list[int]:
    """PIDs of non-zombie processes in process group ``group`` (from ``/proc``)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def find_dovecot(binary: str = "dovecot") -> str:
    """Path of the Dovecot master binary, or :class:`DovecotNotInstalled` with the install hint."""
    found = shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise DovecotNotInstalled(
            f"Dovecot ({binary!r}) is not installed; the test lab needs it: {INSTALL_HINT}"
        )
    return found


class LabDovecot:
    """A private Dovecot instance validating OAuth tokens against ``oauth``.

    ::

        lab = LabDovecot(oauth_server).start()
        user = lab.new_user()
        imaplib.IMAP4_SSL(lab.host, lab.ports["imaps"], ssl_context=...)
        lab.stop()

    Attributes after ``start()``: ``host`` ("127.0.0.1"), ``ports`` (``imap``, ``imaps``,
    ``pop3``, ``pop3s``), ``ca_file`` (PEM of the lab CA), ``password`` (for PLAIN/LOGIN),
    ``dir``, ``log_path``, ``config_path``.
    """

    host = "127.0.0.1"
    password = LAB_PASSWORD

    def __init__(self, oauth: LabOAuthServer, *, binary: str = "dovecot",
                 base_dir: Path | None = None) -> None:
        self.oauth = oauth
        self._binary = binary
        self._parent_dir = base_dir
        self._owns_dir = False
        self._process: subprocess.Popen[bytes] | None = None
        self.instance_name = f"mailgate-lab-{os.getpid()}-{next(_instance_counter)}"
        self.dir: Path = Path()
        self.ports: dict[str, int] = {}
        self.sink: LabSmtpSink | None = None

    # ----------------------------------------------------------------- paths

    @property
    def config_path(self) -> Path:
        return self.dir / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        """Dovecot's single log file (errors, info and debug)."""
        return self.dir / "dovecot.log"

    @property
    def ca_file(self) -> Path:
        """PEM of the CA that signed the server certificate."""
        return self.dir / "ca.pem"

    @property
    def mail_dir(self) -> Path:
        return self.dir / "mail"

    # ----------------------------------------------------------------- users

    def new_user(self, prefix: str = "u") -> str:
        """A user name no other test of this process has used, e.g. ``u12-4711@example.com``."""
        return f"{prefix}{next(_user_counter)}-{os.getpid()}@example.com"

    def log_text(self) -> str:
        """The Dovecot log so far (for assertions and failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> LabDovecot:
        """Write the config, start Dovecot and wait for all ports. Returns ``self``."""
        if self._process is not None:
            raise RuntimeError("LabDovecot already started")
        binary = find_dovecot(self._binary)
        if self._parent_dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="mailgate-dovecot-"))
            self._owns_dir = True
        else:
            self.dir = Path(self._parent_dir)
            self.dir.mkdir(parents=True, exist_ok=True)
        self._prepare_dir()
        self.sink = LabSmtpSink(self.dir / "sink").start()
        last_error = ""
        for _attempt in range(START_ATTEMPTS):
            self.ports = {name: _free_port() for name in LISTENERS}
            self.config_path.write_text(self._render_config())
            try:
                self._spawn(binary)
                atexit.register(self.stop)  # a crashed test run must not leak Dovecot
                return self
            except RuntimeError as exc:
                last_error = str(exc)
        self.sink.stop()
        self._cleanup_dir()
        raise RuntimeError(f"Dovecot did not start: {last_error}")

    def stop(self) -> None:
        """Stop the master and all its children, then remove the lab directory. Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            atexit.unregister(self.stop)
            self._terminate(process)
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.stop()
        self._cleanup_dir()

    def __enter__(self) -> LabDovecot:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def kill_connections(self, user: str) -> bool:
        """Disconnect every IMAP/POP3 session of ``user`` (``doveadm kick``), as an upstream
        outage would. Returns whether any session was kicked."""
        result = subprocess.run(
            ["doveadm", "-c", str(self.config_path), "kick", user],
            check=False, capture_output=True, text=True, timeout=STOP_TIMEOUT,
        )
        if result.returncode == DOVEADM_EX_NOUSER:
            return False
        if result.returncode != 0:
            raise RuntimeError(f"doveadm kick failed: {result.stderr.strip()}")
        return True

    # ----------------------------------------------------------------- internals

    def _check_reachable(self) -> None:
        """As root, mail processes run as ``nobody``: every ancestor must be traversable."""
        if os.geteuid() != 0:
            return
        for ancestor in self.dir.resolve().parents:
            if not ancestor.stat().st_mode & 0o001:
                raise RuntimeError(
                    f"{ancestor} is not traversable by {MAIL_OWNER}; put the lab directory "
                    "elsewhere (e.g. leave base_dir unset for a fresh one under /tmp)"
                )

    def _prepare_dir(self) -> None:
        self._check_reachable()
        os.chmod(self.dir, 0o755)  # login/mail processes run unprivileged
        for sub in ("run", "state", "sink"):
            (self.dir / sub).mkdir(exist_ok=True)
        self.mail_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            owner = pwd.getpwnam(MAIL_OWNER)
            os.chown(self.mail_dir, owner.pw_uid, owner.pw_gid)
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert.private_key_pem.write_to_path(str(self.dir / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(self.dir / "cert.pem"))
        os.chmod(self.dir / "key.pem", 0o600)
        (self.dir / "oauth2.conf.ext").write_text(
            "introspection_mode = post\n"
            f"introspection_url = {self.oauth.introspect_url}\n"
            "username_attribute = username\n"
            "active_attribute = active\n"
            "active_value = true\n"
            f"timeout_msecs = {INTROSPECTION_TIMEOUT_MS}\n"
        )

    def _users_block(self) -> str:
        if os.geteuid() == 0:
            owner = pwd.getpwnam(MAIL_OWNER)
            return (
                "default_login_user = dovenull\n"
                "default_internal_user = dovecot\n"
                f"first_valid_uid = {owner.pw_uid}\nlast_valid_uid = {owner.pw_uid}\n"
                f"first_valid_gid = {owner.pw_gid}\nlast_valid_gid = {owner.pw_gid}\n"
            ), f"uid={owner.pw_uid} gid={owner.pw_gid}"
        me = pwd.getpwuid(os.getuid())
        return (
            f"default_login_user = {me.pw_name}\n"
            f"default_internal_user = {me.pw_name}\n"
            f"first_valid_uid = {me.pw_uid}\n"
        ), f"uid={me.pw_uid} gid={me.pw_gid}"

    def _render_config(self) -> str:
        d = self.dir
        users, ids = self._users_block()
        chroot = "" if os.geteuid() == 0 else "  chroot =\n"
        return f"""\
# Generated by tests/lab/dovecot.py -- a private test instance, loopback only.
instance_name = {self.instance_name}
base_dir = {d}/run
state_dir = {d}/state
log_path = {self.log_path}
info_log_path = {self.log_path}
debug_log_path = {self.log_path}
listen = 127.0.0.1
protocols = imap pop3 submission
hostname = submission.lab
submission_relay_host = {self.sink.host if self.sink else "127.0.0.1"}
submission_relay_port = {self.sink.port if self.sink else 25}
submission_relay_trusted = yes
submission_max_mail_size = 0
{users}
ssl = yes
ssl_cert = <{d}/cert.pem
ssl_key = <{d}/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
auth_cache_size = 0
auth_failure_delay = 0
default_process_limit = {PROCESS_LIMIT}
default_client_limit = {CLIENT_LIMIT}
mail_max_userip_connections = {MAX_USERIP_CONNECTIONS}
mail_location = maildir:~/Maildir
pop3_uidl_format = %08Xu%08Xv
imap_max_line_length = 1M
# IDLE falls back to polling when the inotify instance limit (128 per UID) is used up by many
# concurrent imap processes (load tests, parallel workers): poll every second, not every 30.
mailbox_idle_check_interval = 1 secs

passdb {{
  driver = static
  args = password={self.password}
  mechanisms = plain login
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {d}/oauth2.conf.ext
}}
userdb {{
  driver = static
  args = {ids} home={d}/mail/%Lu allow_all_users=yes
}}

namespace inbox {{
  inbox = yes
  separator = /
  mailbox Trash {{
    special_use = \\Trash
    auto = subscribe
  }}
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox Drafts {{
    special_use = \\Drafts
    auto = subscribe
  }}
  mailbox Junk {{
    special_use = \\Junk
    auto = subscribe
  }}
}}

# "High-performance" login processes (service_count = 0): one process serves many
# connections; a fork+exec per connection cost ~70 ms on 2 cores.
service imap-login {{
{chroot}  service_count = 0
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.ports["imap"]}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.ports["imaps"]}
    ssl = yes
  }}
}}
service pop3-login {{
{chroot}  service_count = 0
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.ports["pop3"]}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {self.ports["pop3s"]}
    ssl = yes
  }}
}}
service submission-login {{
{chroot}  service_count = 0
  inet_listener submission {{
    address = 127.0.0.1
    port = {self.ports["submission"]}
  }}
  inet_listener submissions {{
    address = 127.0.0.1
    port = {self.ports["submissions"]}
    ssl = yes
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""

    def _spawn(self, binary: str) -> None:
        for stale in (self.dir / "run").iterdir():  # stale sockets slow a restart down
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        with open(self.dir / "master.stderr", "wb") as stderr:  # the child keeps its own copy
            process = subprocess.Popen(
                [binary, "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        pending = set(LISTENERS)
        while pending:
            if process.poll() is not None:
                self._cleanup_sockets()
                raise RuntimeError(self._startup_diagnostics(process.returncode))
            pending = {
                n for n in pending
                if not _port_ready(self.host, self.ports[n], expect_greeting=not n.endswith("s"))
            }
            if pending and time.monotonic() > deadline:
                self._terminate(process)
                raise RuntimeError(f"ports {sorted(pending)} never opened\n"
                                   + self._startup_diagnostics(None))
            if pending:
                time.sleep(POLL_INTERVAL)
        self._process = process

    def _startup_diagnostics(self, returncode: int | None) -> str:
        stderr = (self.dir / "master.stderr").read_text(errors="replace")
        return f"dovecot exited with {returncode}: {stderr.strip()}\n{self.log_text()[-2000:]}"

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM the whole process group, SIGKILL it after ``STOP_GRACE``, reap the master.

        The group is signalled at once because the master alone would wait for children; a
        login process caught mid-start-up ignores SIGTERM for seconds, hence the SIGKILL.
        """
        group = process.pid
        self._signal_group(group, signal.SIGTERM)
        if not self._wait_group_gone(process, STOP_GRACE):
            self._signal_group(group, signal.SIGKILL)
            if not self._wait_group_gone(process, STOP_TIMEOUT):
                raise RuntimeError(f"Dovecot processes of group {group} survived SIGKILL")
        process.wait(timeout=STOP_TIMEOUT)
        self._cleanup_sockets()

    @staticmethod
    def _signal_group(group: int, signum: int) -> None:
        try:
            os.killpg(group, signum)
        except ProcessLookupError:
            pass

    @staticmethod
    def _wait_group_gone(process: subprocess.Popen[bytes], timeout: float) -> bool:
        """Wait until no live process of the master's group is left (reaping the master).

        Zombies count as gone: orphaned children are reaped by PID 1, which in a container
        may take its time.
        """
        deadline = time.monotonic() + timeout
        while True:
            process.poll()
            if not _live_group_members(process.pid):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_INTERVAL)

    def _cleanup_sockets(self) -> None:
        shutil.rmtree(self.dir / "run", ignore_errors=True)
        (self.dir / "run").mkdir(exist_ok=True)

    def _cleanup_dir(self) -> None:
        if self._owns_dir and self.dir != Path():
            shutil.rmtree(self.dir, ignore_errors=True)
            self._owns_dir = False
