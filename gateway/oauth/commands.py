"""The logic of ``mailgate authorize``, ``mailgate passwd`` and the account part of
``mailgate check``; ``gateway/cli.py`` only parses arguments and calls these. ``authorize`` and
``passwd`` are blocking (they run trio themselves); ``authorize_async`` / ``passwd_async`` are
the same commands for callers already inside trio (tests, the admin plane).

Each command returns a process exit status (0 success, 1 failure, 2 usage problem) and writes
human-readable lines to ``stdout`` — never a password, token or code. Input comes from
``stdin``: with ``password_stdin`` the first line is the local password (for ``passwd``: the
current password first when one is needed, then the new one); with ``refresh_token_stdin``
the next line is the refresh token to import. Without ``password_stdin`` passwords are asked
on the terminal (getpass), twice for a new one.

State changes are all-or-nothing: the account record and its sealed refresh token are written
in one transaction only after the identity provider issued the tokens, and a wrong current
password changes nothing.
"""

from __future__ import annotations

import functools
import getpass
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, TextIO

import trio

from ..errors import MailgateError
from . import credentials, flows, grants, lifecycle
from .accounts import REFRESH_FLOWS, STATUS_NEEDS_REAUTHORIZATION
from .endpoint import OAuthErrorResponse, TokenResponse
from .passwords import KdfPool, check_password_policy
from .sealing import SealError
from .send_scope import send_scope_problem
from .store import REFRESH_TOKEN, StoreError, open_store

if TYPE_CHECKING:
    from ..config import Config, ProviderConfig, UserConfig
    from ..ports import CredentialStore

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CommandError(MailgateError):
    """A user-facing reason why a command could not run (exit status in ``status``)."""

    def __init__(self, message: str, status: int = EXIT_FAILED):
        super().__init__(message)
        self.status = status


class _Console:
    """Reading lines and passwords, writing lines: the only place commands do terminal I/O."""

    def __init__(self, stdin: TextIO, stdout: TextIO, password_stdin: bool):
        self.stdin, self.stdout, self.password_stdin = stdin, stdout, password_stdin

    def show(self, line: str) -> None:
        self.stdout.write(line + "\n")
        self.stdout.flush()

    async def read_line(self) -> str:
        line = await trio.to_thread.run_sync(self.stdin.readline, abandon_on_cancel=True)
        return line.rstrip("\r\n")

    async def password(self, prompt: str, *, new: bool = False) -> str:
        if self.password_stdin:
            password = await self.read_line()
            if not password:
                raise CommandError("expected a password line on standard input", EXIT_USAGE)
        else:
            if not self.stdin.isatty():
                raise CommandError("no terminal to ask a password on: use --password-stdin",
                                   EXIT_USAGE)
            password = await trio.to_thread.run_sync(getpass.getpass, prompt + ": ")
            if new and password != await trio.to_thread.run_sync(getpass.getpass, "Again: "):
                raise CommandError("the two passwords differ")
        if new:
            try:
                check_password_policy(password)
            except ValueError as exc:
                raise CommandError(str(exc), EXIT_USAGE) from None
        return password


def _user(config: "Config", name: str) -> tuple["UserConfig", "ProviderConfig"]:
    user = config.users.get(name)
    if user is None:
        known = ", ".join(sorted(config.users)) or "none"
        raise CommandError(f"no user {name!r} in the configuration (users: {known})", EXIT_USAGE)
    return user, config.provider_for(user)


async def _daemon_key(provider: "ProviderConfig") -> bytes | None:
    try:
        return await lifecycle.daemon_key(provider)
    except (SealError, OSError) as exc:
        raise CommandError(str(exc)) from None


async def _run(command: Callable[[], Awaitable[int]], stdout: TextIO) -> int:
    try:
        return await command()
    except CommandError as exc:
        stdout.write(f"error: {exc}\n")
        return exc.status
    except (MailgateError, OAuthErrorResponse, StoreError) as exc:
        stdout.write(f"error: {exc}\n")
        return EXIT_FAILED


# --- mailgate authorize ----------------------------------------------------------------------


def authorize(
    config: "Config", user: str, *, manual: bool = False, refresh_token_stdin: bool = False,
    password_stdin: bool = False, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
) -> int:
    """``mailgate authorize``: the blocking entry point for the CLI (see :func:`authorize_async`)."""
    return trio.run(functools.partial(
        authorize_async, config, user, manual=manual, refresh_token_stdin=refresh_token_stdin,
        password_stdin=password_stdin, stdin=stdin, stdout=stdout,
    ))


async def authorize_async(
    config: "Config", user: str, *, manual: bool = False, refresh_token_stdin: bool = False,
    password_stdin: bool = False, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
) -> int:
    """Set up (or renew) an account: local password, then the upstream grant."""
    console = _Console(stdin, stdout, password_stdin)
    return await _run(
        lambda: _authorize(config, user, console, manual=manual, import_token=refresh_token_stdin),
        stdout,
    )


async def _authorize(
    config: "Config", name: str, console: _Console, *, manual: bool, import_token: bool
) -> int:
    user, provider = _user(config, name)
    if import_token and provider.flow not in REFRESH_FLOWS:
        raise CommandError(f"flow {provider.flow!r} uses no refresh token to import", EXIT_USAGE)
    store = open_store(config)
    daemon_key = await _daemon_key(provider)
    existing = await trio.to_thread.run_sync(store.account, name)
    password = await console.password(
        f"Local password for {name}", new=existing is None
    )
    try:
        answer = await lifecycle.authorize_account(
            store, KdfPool(config.limits.kdf_concurrency), name=name, provider=provider,
            password=password, existing=existing, daemon_key=daemon_key,
            obtain=lambda: _obtain(config, user, provider, console, manual=manual,
                                   import_token=import_token),
        )
    except lifecycle.WrongPassword as exc:
        raise CommandError(f"{exc} (nothing was changed); to set a new one run: "
                           f"mailgate passwd {name} --reset") from None
    except (SealError, lifecycle.NoRefreshToken) as exc:
        raise CommandError(str(exc)) from None
    lifetime = f"{answer.expires_in:.0f} s" if answer.expires_in else "unknown time"
    console.show(f"{name}: authorized with {provider.name} ({provider.flow}); "
                 f"an access token was issued, valid for {lifetime}")
    return EXIT_OK


async def _obtain(
    config: "Config", user: "UserConfig", provider: "ProviderConfig", console: _Console, *,
    manual: bool, import_token: bool,
) -> TokenResponse:
    timeout = config.limits.token_request_timeout
    try:
        if import_token:
            refresh_token = (await console.read_line()).strip()
            if not refresh_token:
                raise CommandError("expected the refresh token on standard input", EXIT_USAGE)
            answer = await grants.refresh(provider, refresh_token, timeout=timeout)
            # Providers that do not rotate return no new refresh token: keep the imported one.
            return replace(answer, refresh_token=answer.refresh_token or refresh_token)
        if provider.flow == "device":
            return await flows.device_code(provider, show=console.show, timeout=timeout)
        if provider.flow == "authorization_code":
            if manual:
                return await flows.authorization_code_manual(
                    provider, login_hint=user.upstream_user, show=console.show,
                    read_line=console.read_line, timeout=timeout,
                )
            return await flows.authorization_code_loopback(
                provider, login_hint=user.upstream_user, show=console.show, timeout=timeout
            )
        return await flows.app_token(provider, subject=user.upstream_user, timeout=timeout)
    except OAuthErrorResponse as exc:
        raise CommandError(f"the identity provider refused: {exc}") from None
    except ValueError as exc:  # an unreadable service-account key file
        raise CommandError(str(exc)) from None


# --- mailgate passwd -------------------------------------------------------------------------


def passwd(
    config: "Config", user: str, *, password_stdin: bool = False, reset: bool = False,
    stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
) -> int:
    """``mailgate passwd``: the blocking entry point for the CLI (see :func:`passwd_async`)."""
    return trio.run(functools.partial(
        passwd_async, config, user, password_stdin=password_stdin, reset=reset, stdin=stdin,
        stdout=stdout,
    ))


async def passwd_async(
    config: "Config", user: str, *, password_stdin: bool = False, reset: bool = False,
    stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
) -> int:
    """Set or change a local password. Changing keeps the stored grant (its data key is
    re-wrapped); ``reset`` sets a password without knowing the old one and discards the grant."""
    console = _Console(stdin, stdout, password_stdin)
    return await _run(lambda: _passwd(config, user, console, reset=reset), stdout)


async def _passwd(config: "Config", name: str, console: _Console, *, reset: bool) -> int:
    _, provider = _user(config, name)
    store = open_store(config)
    kdf = KdfPool(config.limits.kdf_concurrency)
    daemon_key = await _daemon_key(provider)
    existing = await trio.to_thread.run_sync(store.account, name)
    data_key: bytes | None = None
    if existing is not None and not reset:
        if existing.key_wrapping == "keyfile" and daemon_key is not None:
            try:
                data_key = credentials.unwrap(existing, daemon_key=daemon_key)
            except SealError as exc:
                raise CommandError(str(exc)) from None
        else:
            current = await console.password(f"Current local password for {name}")
            try:
                data_key = await kdf.run(
                    lambda: credentials.unlock(existing, current, daemon_key=daemon_key)
                )
            except SealError as exc:
                raise CommandError(str(exc)) from None
            if data_key is None:
                raise CommandError(f"wrong current password for {name} (nothing was changed; "
                                   f"--reset sets a new one and discards the authorization)")
    new = await console.password(f"New local password for {name}", new=True)
    if existing is not None and data_key is not None:
        record = await kdf.run(
            lambda: credentials.change_password(existing, data_key, new, daemon_key=daemon_key)
        )
        await trio.to_thread.run_sync(store.save_account, record, None)
        console.show(f"{name}: local password changed")
        return EXIT_OK
    record, _ = await kdf.run(
        lambda: credentials.new_record(name, provider.name, new, daemon_key=daemon_key)
    )
    await trio.to_thread.run_sync(store.save_account, record, {})
    if provider.flow in REFRESH_FLOWS:
        console.show(f"{name}: local password set; no authorization is stored: "
                     f"run: mailgate authorize {name}")
    else:
        console.show(f"{name}: local password set")
    return EXIT_OK


# --- mailgate check (accounts) ---------------------------------------------------------------


def account_status(config: "Config", stdout: TextIO = sys.stdout) -> int:
    """One line per configured user; exit 1 when any account needs an admin's action.
    Offline: reads the state store only, contacts no identity provider."""
    try:
        store = open_store(config)
    except StoreError as exc:
        stdout.write(f"error: {exc}\n")
        return EXIT_FAILED
    worst = EXIT_OK
    sending = any(lst.protocol == "smtp" for lst in config.listeners)
    for name, user in sorted(config.users.items()):
        problem = account_problem(store, name, config.provider_for(user))
        if problem is None and sending:
            problem = send_scope_problem(store, name, config.provider_for(user))
        if problem:
            worst = EXIT_FAILED
            stdout.write(f"{name}: {problem}\n")
        else:
            stdout.write(f"{name}: ok ({user.provider}, {config.provider_for(user).flow})\n")
    return worst


def account_problem(store: "CredentialStore", name: str, provider: "ProviderConfig") -> str | None:
    """What keeps account ``name`` from working, with the command that fixes it (or None)."""
    record = store.account(name)
    if record is None:
        return f"not set up: run: mailgate authorize {name}"
    if provider.flow in REFRESH_FLOWS:
        secret = store.secret(name, REFRESH_TOKEN)
        if secret is None:
            return f"no authorization stored: run: mailgate authorize {name}"
        if secret.provider != provider.name:
            return (f"authorized for provider {secret.provider!r} but configured for "
                    f"{provider.name!r}: run: mailgate authorize {name}")
    status = store.status(name)
    if status is not None and status.state == STATUS_NEEDS_REAUTHORIZATION:
        return (f"the identity provider refused the grant ({status.detail}): "
                f"run: mailgate authorize {name}")
    if provider.key_file is not None and record.key_wrapping != "keyfile":
        return f"sealed with its password, but a key file is configured: run: mailgate passwd {name}"
    return None
