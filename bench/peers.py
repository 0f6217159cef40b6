"""The peers: what a user would run instead of mailgate, configured against the same lab.

Theory of operation
-------------------
Two peers run beside mailgate, each as a separate process talking to the lab's Dovecot over
IMAPS (lab CA trusted) with XOAUTH2 and a lab access token, and each serving the benchmark's
raw-socket clients over implicit TLS with a throw-away ``trustme`` certificate:

* **emailproxy** (email-oauth2-proxy, ``python -m emailproxy --no-gui``): an IMAP proxy that
  turns the client's ``LOGIN user password`` into ``AUTHENTICATE XOAUTH2`` and then relays
  bytes. Its tokens live in its cache store (``--cache-store``), encrypted with a Fernet key
  derived from the client's password (PBKDF2-SHA256, :data:`EMAILPROXY_ITERATIONS`, a
  per-account ``token_salt``). :func:`emailproxy_cache` writes exactly what the proxy itself
  saves after a browser authorisation -- salt, iteration count, encrypted access token, its
  expiry, encrypted refresh token -- so the proxy logs in at once, with no browser and no
  token request. The account name is the upstream mailbox (the proxy sends the client's user
  name upstream unchanged); ``SSL_CERT_FILE`` makes its default TLS context trust the lab CA.
* **imapc** (Dovecot's own POP3 server over its ``imapc`` storage): a second, private Dovecot
  instance (own temp directory, own ``instance_name``, POP3S only) whose mail storage is the
  lab's IMAPS account (``imapc_user = %u``, ``imapc_sasl_mechanisms = xoauth2``). A POP3
  client logs in with a local password from a ``passwd-file`` passdb; the same line carries
  ``userdb_imapc_password=<access token>``, which the ``prefetch`` userdb turns into that
  user's ``imapc_password``: Dovecot's XOAUTH2 client sends it as the bearer token.

Both take access tokens the benchmark obtains from the lab OAuth server before they start
(an hour's lifetime: longer than a run). Secrets go only into files below the peer's
private directory (mode 0600), never to a log or the terminal.

:class:`Peers` starts both and keeps, per peer, either its endpoint or the reason it is not
running; the figures then print ``n/a (reason)`` for that peer's column.
"""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.gateway_proc import accepts, file_tail, free_port
from bench.labproc import LabInfo
from bench.wire import Endpoint

__all__ = [
    "ACCESS_TOKEN_LIFETIME",
    "PeerAccount",
    "EMAILPROXY",
    "IMAPC",
    "EMAILPROXY_ITERATIONS",
    "emailproxy_config",
    "emailproxy_cache",
    "imapc_config",
    "imapc_passwd_file",
    "PeerProcess",
    "Peers",
    "start_peers",
]

#: Column names of the peers in the table.
EMAILPROXY = "emailproxy"
IMAPC = "imapc"
#: emailproxy's PBKDF2 iteration count for its token encryption (``Cryptographer.ITERATIONS``
#: of the pinned version): a cache written with fewer is re-encrypted on first login.
EMAILPROXY_ITERATIONS = 1_200_000
#: Lifetime of the lab access tokens handed to the peers (the lab OAuth server's own default,
#: longer than a run).
ACCESS_TOKEN_LIFETIME = 3600
#: How long a peer may take until its listener accepts connections.
START_TIMEOUT = 30.0
#: SIGTERM grace before SIGKILL when stopping a peer.
STOP_TIMEOUT = 10.0
#: Poll step while waiting for a listener.
POLL_INTERVAL = 0.05
#: Connection and process limits of the imapc instance (the lab's own values).
IMAPC_PROCESS_LIMIT = 1000
IMAPC_CLIENT_LIMIT = 5000
IMAPC_MAX_USERIP_CONNECTIONS = 1000
#: Unprivileged owner of the imapc instance's index files when running as root.
MAIL_OWNER = "nobody"


@dataclass(frozen=True)
class PeerAccount:
    """One lab mailbox as a peer serves it: the client logs in as ``user`` with ``password``;
    the peer uses ``access``/``refresh`` (lab tokens) upstream."""

    user: str
    password: str
    access: str
    refresh: str
    expires_at: int

    def __repr__(self) -> str:  # never show a secret
        return f"PeerAccount({self.user!r}, ***)"


# ------------------------------------------------------------------------------ emailproxy


def emailproxy_config(lab: LabInfo, port: int, cert: Path, key: Path,
                      users: Iterable[str]) -> str:
    """emailproxy's ``--config-file``: one implicit-TLS IMAP server on ``127.0.0.1:port``
    relaying to the lab's IMAPS, and one account section per upstream user."""
    lines = [
        "[emailproxy]",
        "delete_account_token_on_password_error = False",
        f"[IMAP-{port}]",
        "local_address = 127.0.0.1",
        # An address, not "localhost": the proxy connects without waiting on a failed ::1,
        # and the lab certificate names 127.0.0.1.
        f"server_address = {lab.host}",
        f"server_port = {lab.ports['imaps']}",
        f"local_certificate_path = {cert}",
        f"local_key_path = {key}",
    ]
    for user in users:
        lines += [
            f"[{user}]",
            f"permission_url = {lab.authorize_url}",
            f"token_url = {lab.token_url}",
            "oauth2_scope = mail",
            "redirect_uri = http://localhost",
            f"client_id = {lab.client_id}",
            f"client_secret = {lab.client_secret}",
        ]
    return "\n".join(lines) + "\n"


def _fernet_key(password: str, salt: bytes, iterations: int) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=iterations)
    return base64.urlsafe_b64encode(kdf.derive(password.encode()))


def emailproxy_cache(accounts: Iterable[PeerAccount], *,
                     iterations: int = EMAILPROXY_ITERATIONS,
                     salt: Callable[[], bytes] = lambda: os.urandom(16)) -> str:
    """emailproxy's ``--cache-store`` file with every account already authorised: what the
    proxy saves after a browser authorisation, tokens encrypted under the account's password."""
    from cryptography.fernet import Fernet

    lines: list[str] = []
    for account in accounts:
        account_salt = salt()
        fernet = Fernet(_fernet_key(account.password, account_salt, iterations))
        lines += [
            f"[{account.user}]",
            f"token_salt = {base64.b64encode(account_salt).decode()}",
            f"token_iterations = {iterations}",
            f"access_token = {fernet.encrypt(account.access.encode()).decode()}",
            f"access_token_expiry = {account.expires_at}",
            f"refresh_token = {fernet.encrypt(account.refresh.encode()).decode()}",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ imapc


def _owner_block() -> tuple[str, int, int]:
    """Settings naming the unprivileged users, and the uid/gid the mail processes run as."""
    if os.geteuid() == 0:
        owner = pwd.getpwnam(MAIL_OWNER)
        return (
            "default_login_user = dovenull\n"
            "default_internal_user = dovecot\n"
            f"first_valid_uid = {owner.pw_uid}\nlast_valid_uid = {owner.pw_uid}\n"
            f"first_valid_gid = {owner.pw_gid}\nlast_valid_gid = {owner.pw_gid}\n"
        ), owner.pw_uid, owner.pw_gid
    me = pwd.getpwuid(os.getuid())
    return (
        f"default_login_user = {me.pw_name}\n"
        f"default_internal_user = {me.pw_name}\n"
        f"first_valid_uid = {me.pw_uid}\n"
    ), me.pw_uid, me.pw_gid


def imapc_config(directory: Path, lab: LabInfo, port: int, instance_name: str,
                 owners: str) -> str:
    """``dovecot.conf`` of the imapc instance: POP3S on ``127.0.0.1:port``, mail from the
    lab's IMAPS account of the same name, logged in with XOAUTH2."""
    d = directory
    return f"""\
# Written by bench/peers.py: Dovecot's POP3 server over imapc, loopback only.
instance_name = {instance_name}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
listen = 127.0.0.1
protocols = pop3
{owners}
ssl = yes
ssl_cert = <{d}/cert.pem
ssl_key = <{d}/key.pem
ssl_client_ca_file = {lab.ca_file}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
default_process_limit = {IMAPC_PROCESS_LIMIT}
default_client_limit = {IMAPC_CLIENT_LIMIT}
mail_max_userip_connections = {IMAPC_MAX_USERIP_CONNECTIONS}
mail_location = imapc:~/imapc
imapc_host = {lab.host}
imapc_port = {lab.ports['imaps']}
imapc_ssl = imaps
imapc_ssl_verify = yes
imapc_user = %u
imapc_sasl_mechanisms = xoauth2
# Sizes from RFC822.SIZE (else POP3 STAT would fetch every message), headers when asked.
imapc_features = rfc822.size fetch-headers
pop3_uidl_format = %08Xu%08Xv

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = prefetch
}}

service pop3-login {{
  chroot =
  service_count = 0
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {port}
    ssl = yes
  }}
}}
"""


def imapc_passwd_file(accounts: Iterable[PeerAccount], home: Path, uid: int, gid: int) -> str:
    """``passwd-file`` lines: the local password, and the userdb fields the ``prefetch``
    userdb returns -- uid, gid, home, and the access token as the user's ``imapc_password``
    (a userdb field overrides the setting of that name for that user)."""
    return "".join(
        f"{a.user}:{{PLAIN}}{a.password}::::::userdb_uid={uid} userdb_gid={gid} "
        f"userdb_home={home}/{a.user} userdb_imapc_password={a.access}\n"
        for a in accounts
    )


# ------------------------------------------------------------------------------ processes


class PeerProcess:
    """One peer as a child process in its own process group: started, waited for until
    ``port`` accepts connections, stopped with SIGTERM to the group (SIGKILL after a grace)."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path,
                 env: dict[str, str] | None = None, remove: Path | None = None) -> None:
        self.name = name
        self._remove = remove
        self._argv = argv
        self.port = port
        self.log_path = log_path
        self._env = env
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._proc.pid

    def start(self) -> PeerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        try:
            self._proc = subprocess.Popen(
                self._argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=self._env, start_new_session=True,
            )
        finally:
            log.close()
        try:
            self._wait_listening(self._proc)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not accepts(self.port):
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {proc.returncode}: "
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} never listened on {self.port}")
            time.sleep(POLL_INTERVAL)

    def log_tail(self, chars: int = 400) -> str:
        return file_tail(self.log_path, chars)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=STOP_TIMEOUT)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._remove is not None:
            shutil.rmtree(self._remove, ignore_errors=True)
            self._remove = None


def _issue_certificate(directory: Path) -> Path:
    """A throw-away CA and a certificate for ``localhost``/``127.0.0.1`` in ``directory``
    (``cert.pem``, ``key.pem``); returns the CA's PEM."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    os.chmod(directory / "key.pem", 0o600)
    return directory / "ca.pem"


def _private_file(path: Path, text: str, mode: int = 0o600) -> None:
    path.touch(mode)
    os.chmod(path, mode)
    path.write_text(text)


def start_emailproxy(directory: Path, lab: LabInfo, accounts: list[PeerAccount],
                     python: str = sys.executable) -> tuple[PeerProcess, Endpoint]:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _issue_certificate(directory)
    port = free_port()
    config = directory / "emailproxy.config"
    cache = directory / "emailproxy.cache"
    _private_file(config, emailproxy_config(lab, port, directory / "cert.pem",
                                            directory / "key.pem", [a.user for a in accounts]))
    _private_file(cache, emailproxy_cache(accounts))
    process = PeerProcess(
        EMAILPROXY,
        [python, "-m", "emailproxy", "--no-gui", "--config-file", str(config),
         "--cache-store", str(cache), "--log-file", str(directory / "emailproxy.log")],
        port, directory / "emailproxy.out",
        env={**os.environ, "SSL_CERT_FILE": str(lab.ca_file)},
    )
    process.start()
    return process, Endpoint("127.0.0.1", port, ca)


def start_imapc(lab: LabInfo, accounts: list[PeerAccount]) -> tuple[PeerProcess, Endpoint]:
    """Dovecot's POP3 over imapc in a fresh directory below the system's temp directory
    (every ancestor must be traversable by the unprivileged auth and mail processes, which
    the benchmark's private work directory is not); ``stop()`` removes it. The process is
    Dovecot's master (``-F``)."""
    from tests.lab.dovecot import find_dovecot

    binary = find_dovecot()
    directory = Path(tempfile.mkdtemp(prefix="mailgate-bench-imapc-"))
    try:
        return _start_imapc_in(directory, binary, lab, accounts)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _start_imapc_in(directory: Path, binary: str, lab: LabInfo, accounts: list[PeerAccount]
                    ) -> tuple[PeerProcess, Endpoint]:
    os.chmod(directory, 0o755)  # login and mail processes run unprivileged
    for sub in ("run", "state", "mail"):
        (directory / sub).mkdir(exist_ok=True)
    owners, uid, gid = _owner_block()
    os.chown(directory / "mail", uid, gid)
    ca = _issue_certificate(directory)
    port = free_port()
    instance = f"mailgate-bench-imapc-{os.getpid()}"
    config = directory / "dovecot.conf"
    config.write_text(imapc_config(directory, lab, port, instance, owners))
    users = directory / "users"
    _private_file(users, imapc_passwd_file(accounts, directory / "mail", uid, gid))
    if os.geteuid() == 0:
        # The auth process reads it as the internal user.
        shutil.chown(users, group=pwd.getpwnam("dovecot").pw_gid)
        os.chmod(users, 0o640)
    process = PeerProcess(IMAPC, [binary, "-F", "-c", str(config)], port,
                          directory / "dovecot.out", remove=directory)
    process.start()
    return process, Endpoint("127.0.0.1", port, ca)


@dataclass
class Peers:
    """The running peers: endpoints, accounts and processes, or why a peer is not running."""

    accounts: dict[str, dict[str, PeerAccount]] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    processes: dict[str, PeerProcess] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def why_not(self, peer: str) -> str | None:
        if peer in self.endpoints:
            return None
        return self.unavailable.get(peer, "not started")

    def account(self, peer: str, user: str) -> PeerAccount:
        return self.accounts[peer][user]

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()
        self.processes.clear()
        self.endpoints.clear()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:160]}"


def emailproxy_missing(python: str) -> str | None:
    """Why emailproxy cannot run (not installed), or None."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('emailproxy') is None)"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    if done.returncode == 0:
        return None
    return "emailproxy is not installed (pip install -e '.[bench]')"


def start_peers(directory: Path, lab: LabInfo, users: dict[str, list[str]],
                tokens: Callable[[str], tuple[str, str]], lifetime: int,
                python: str = sys.executable) -> Peers:
    """Start every peer that has users (``users``: peer -> upstream users it serves);
    ``tokens(user)`` issues a fresh ``(access, refresh)`` pair at the lab. A peer that fails
    to start is recorded in ``unavailable`` with the reason; the others still run."""
    import secrets

    peers = Peers()
    expires_at = int(time.time()) + lifetime
    for peer, names in users.items():
        if not names:
            continue
        try:
            if peer == EMAILPROXY and (missing := emailproxy_missing(python)) is not None:
                raise RuntimeError(missing)
            accounts = []
            for name in names:
                access, refresh = tokens(name)
                accounts.append(PeerAccount(name, secrets.token_urlsafe(12), access, refresh,
                                            expires_at))
            peers.accounts[peer] = {a.user: a for a in accounts}
            if peer == EMAILPROXY:
                process, endpoint = start_emailproxy(directory / peer, lab, accounts, python)
            else:
                process, endpoint = start_imapc(lab, accounts)
            peers.processes[peer] = process
            peers.endpoints[peer] = endpoint
        except Exception as exc:  # noqa: BLE001 - the peer's columns say n/a, the run goes on
            peers.unavailable[peer] = _describe(exc)
    return peers
