"""``mailgate accounts``: every account, its state and what to do, for an admin with a shell.

Theory of operation
-------------------
Offline, like ``mailgate check``: it reads the config, the credential store (is a grant
stored, did the identity provider refuse it) and the running gateway's ``state_dir/health.json``
(written by :mod:`gateway.notify.notifier`: access-token expiry, upstream failures, refused
features, the last error). It contacts no identity provider and no upstream server.

For each ``[users.X]``: provider and flow, upstream user, token state and expiry, upstream
state, the last error and when, and one "to do" line. The exit status is 1 when any account
needs an admin (the same rule as ``mailgate check``), else 0. ``--json`` prints the same as one
JSON object for scripts.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, TextIO

from ..oauth.accounts import REFRESH_FLOWS
from ..oauth.commands import account_problem
from ..oauth.store import REFRESH_TOKEN, StoreError, open_store
from .health import AccountHealth, feature_action
from .notifier import read_health

if TYPE_CHECKING:
    from ..config import Config
    from ..ports import CredentialStore

__all__ = ["AccountLine", "accounts_report", "describe_accounts"]

EXIT_OK, EXIT_FAILED = 0, 1


@dataclass(frozen=True)
class AccountLine:
    name: str
    provider: str
    flow: str
    upstream_user: str
    token: str
    token_valid_until: float | None
    upstream: str
    last_error: str
    last_error_at: float | None
    todo: str

    @property
    def needs_admin(self) -> bool:
        return self.todo != "nothing"


def _when(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _describe(
    config: Config, store: CredentialStore, name: str, health: AccountHealth
) -> AccountLine:
    user = config.users[name]
    provider = config.provider_for(user)
    problem = account_problem(store, name, provider)
    todo = "nothing"
    if problem:
        token = f"not usable: {problem.split(': run:')[0]}"
        todo = "run:" + problem.split("run:", 1)[1] if "run:" in problem else problem
    elif health.needs_reauthorization:
        token = f"refused by the identity provider ({health.reauthorization_detail})"
        todo = f"run: mailgate authorize {name}"
    elif provider.flow in REFRESH_FLOWS:
        secret = store.secret(name, REFRESH_TOKEN)
        token = f"authorized (grant stored {_when(secret.updated if secret else None)})"
    else:
        token = f"app-only ({provider.flow}): no stored grant"
    if health.refused_features:
        features = ", ".join(f.upper() for f in health.refused_features)
        upstream = f"refuses {features} for this mailbox"
        if todo == "nothing":
            todo = feature_action(health.refused_features[0], user.upstream_user)
    elif health.failing_since is not None:
        upstream = f"failing since {_when(health.failing_since)}"
        if todo == "nothing" and health.failing_notified:
            todo = "check the provider's service status and the network path (proxy, firewall)"
    elif health.last_ok_at is not None:
        upstream = f"ok (last login {_when(health.last_ok_at)})"
    else:
        upstream = "not used since the gateway started"
    return AccountLine(
        name=name, provider=provider.name, flow=provider.flow, upstream_user=user.upstream_user,
        token=token, token_valid_until=health.token_valid_until, upstream=upstream,
        last_error=health.last_error, last_error_at=health.last_error_at, todo=todo,
    )


def describe_accounts(config: Config) -> list[AccountLine]:
    """One :class:`AccountLine` per configured user (raises ``StoreError``)."""
    store = open_store(config)
    health = read_health(config.server.state_dir).get("accounts")
    known = health if isinstance(health, dict) else {}
    lines = []
    for name in sorted(config.users):
        raw = known.get(name)
        try:
            state = AccountHealth(**raw) if isinstance(raw, dict) else AccountHealth()
        except TypeError:
            state = AccountHealth()
        lines.append(_describe(config, store, name, state))
    return lines


def accounts_report(config: Config, stdout: TextIO, *, as_json: bool = False) -> int:
    try:
        lines = describe_accounts(config)
    except StoreError as exc:
        stdout.write(f"error: {exc}\n")
        return EXIT_FAILED
    if as_json:
        json.dump({"accounts": [asdict(line) for line in lines]}, stdout, indent=1)
        stdout.write("\n")
    else:
        now = time.time()
        for line in lines:
            stdout.write(f"{line.name}: {line.provider} ({line.flow}), "
                         f"upstream user {line.upstream_user}\n")
            stdout.write(f"  token:      {line.token}\n")
            if line.token_valid_until is not None:
                state = "valid until" if line.token_valid_until > now else "expired at"
                note = ("no new one until the account is authorized again"
                        if line.todo.startswith("run: mailgate authorize")
                        else "refreshed by the gateway when needed")
                stdout.write(f"  access:     {state} {_when(line.token_valid_until)} ({note})\n")
            stdout.write(f"  upstream:   {line.upstream}\n")
            if line.last_error:
                stdout.write(f"  last error: {_when(line.last_error_at)}: {line.last_error}\n")
            stdout.write(f"  to do:      {line.todo}\n")
    return EXIT_FAILED if any(line.needs_admin for line in lines) else EXIT_OK
