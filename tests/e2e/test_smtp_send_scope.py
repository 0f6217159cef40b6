"""'Re-authorize to send': the scope granted at authorize time is recorded, and an account whose
grant cannot send through Microsoft 365 is reported by ``mailgate check`` and the status page."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import trio

from gateway.config import Config
from gateway.oauth.commands import account_status
from gateway.presets import MICROSOFT_SMTP_SCOPE
from gateway.oauth.send_scope import GRANTED_SCOPE, send_scope_problem
from gateway.oauth.store import REFRESH_TOKEN, open_store
from tests.fixtures.gateway import make_config
from tests.lab import LabDovecot, LabOAuthServer
from tests.fixtures.imap import seed_account
from tests.fixtures.smtp import PASSWORD, smtp_config


def m365_config(tmp_path: Path, *, smtp_listener: bool = True) -> Config:
    return make_config(tmp_path, {
        "server": {"state_dir": "state"},
        "listener": [{"protocol": "smtp", "bind": "127.0.0.1:0", "tls": "implicit"}] if smtp_listener else [],
        "providers": {"work": {"preset": "microsoft365", "client_id": "cid"}},
        "users": {"alice": {"provider": "work", "upstream_user": "alice@contoso.com"}},
    })


def store_grant(config: Config, granted: str | None) -> None:
    from gateway.oauth import credentials
    from gateway.oauth.store import SealedSecret

    store = open_store(config)
    record, _ = credentials.new_record("alice", "work", "pw-123456789", daemon_key=None)
    secrets = {REFRESH_TOKEN: SealedSecret("work", b"sealed", 0.0)}
    if granted is not None:
        secrets[GRANTED_SCOPE] = SealedSecret("work", granted.encode(), 0.0)
    store.save_account(record, secrets)


def test_the_microsoft365_preset_asks_for_smtp_send(tmp_path: Path) -> None:
    provider = m365_config(tmp_path).providers["work"]
    assert MICROSOFT_SMTP_SCOPE in provider.scopes
    assert (provider.smtp, provider.smtp_tls) == ("smtp.office365.com:587", "starttls")


@pytest.mark.parametrize("granted, problem", [
    (None, "authorized before mailgate asked for"),  # an account from before: no scope recorded
    ("https://outlook.office.com/IMAP.AccessAsUser.All offline_access", "the grant lacks"),
    (f"https://outlook.office.com/IMAP.AccessAsUser.All {MICROSOFT_SMTP_SCOPE}", None),
])
def test_send_scope_problem(tmp_path: Path, granted: str | None, problem: str | None) -> None:
    config = m365_config(tmp_path)
    store_grant(config, granted)
    found = send_scope_problem(open_store(config), "alice", config.providers["work"])
    if problem is None:
        assert found is None
        return
    assert found is not None and found.startswith("re-authorize to send") and problem in found
    out = io.StringIO()
    assert account_status(config, out) == 1
    assert "alice: re-authorize to send" in out.getvalue()


def test_check_says_nothing_without_an_smtp_listener(tmp_path: Path) -> None:
    config = m365_config(tmp_path, smtp_listener=False)
    store_grant(config, None)
    out = io.StringIO()
    assert account_status(config, out) == 0, out.getvalue()


@pytest.mark.lab
async def test_authorize_records_the_granted_scope(tmp_path: Path, lab: LabDovecot,
                                                   oauth_server: LabOAuthServer) -> None:
    upstream_user = lab.new_user("scope")
    config = smtp_config(tmp_path, lab, oauth_server, upstream_user)
    _, refresh_token = oauth_server.issue_tokens(upstream_user)
    await seed_account(config, refresh_token, PASSWORD)
    row = await trio.to_thread.run_sync(open_store(config).secret, "alice", GRANTED_SCOPE)
    assert row is not None and row.sealed.decode().split() == ["mail"]
