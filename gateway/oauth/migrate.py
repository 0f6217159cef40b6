"""``mailgate migrate-store``: copy the SQLite state file into the configured PostgreSQL store.

Theory of operation
-------------------
Moving from one instance to several must not make any user authorize again. The copy is
byte-for-byte: account records (verifier, wrapped data key, key wrapping, creation time),
sealed secrets (the refresh token and the shared access token, still sealed: nothing is
unsealed, so no password or key file is needed), status rows, and the login defence's
remembered client addresses with the key their digests were made under (so working devices stay
remembered). Each account is one write transaction on the target, so a run that stops half-way
leaves whole accounts; running it again copies everything again (accounts already in the target
are replaced, others there are kept).

The source is ``server.state_dir``'s SQLite file (read-only: it is left as it was, a fallback);
the target is ``[store] url``, which must be set. Stop the gateways first, or run it again
after their last write.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

from .shared_token import ACCESS_TOKEN
from .store import REFRESH_TOKEN, SealedSecret, StateStore, StoreError, open_store

if TYPE_CHECKING:
    from ..config import Config
    from ..ports import CredentialStore

__all__ = ["copy_accounts", "copy_remembered_addresses", "migrate_store"]

#: Every kind of sealed secret a store holds per account.
SECRET_KINDS = (REFRESH_TOKEN, ACCESS_TOKEN)


def copy_accounts(source: CredentialStore, target: CredentialStore) -> list[str]:
    """Copy every account of ``source`` into ``target``; the names copied."""
    copied = []
    for name in source.account_names():
        record = source.account(name)
        if record is None:  # deleted meanwhile
            continue
        secrets: dict[str, SealedSecret] = {}
        for kind in SECRET_KINDS:
            secret = source.secret(name, kind)
            if secret is not None:
                secrets[kind] = secret
        target.save_account(record, secrets)
        status = source.status(name)
        if status is not None:
            target.set_status(name, status.state, status.detail)
        copied.append(name)
    return copied


def copy_remembered_addresses(source: CredentialStore, target: CredentialStore) -> int:
    """The addresses users logged in from (the login defence's memory), with the key their
    digests were made under: so working devices stay remembered. The number copied."""
    target.adopt_address_key(source.address_key())
    rows = source.trusted_addresses()
    for account, digest, last_seen in rows:
        target.remember_address(account, digest, last_seen, forget_before=0.0)
    return len(rows)


def migrate_store(config: Config, out: TextIO) -> int:
    """The command: 0 when every account was copied, 1 otherwise (with the reason)."""
    if config.store.url is None:
        print("mailgate: migrate-store copies into [store] url, which is not set", file=out)
        return 1
    source_file = config.server.state_dir / "mailgate.sqlite3"
    if not source_file.exists():
        print(f"mailgate: no state file to copy at {source_file}", file=out)
        return 1
    target = None
    try:
        source = StateStore(config.server.state_dir)
        target = open_store(config)
        names = copy_accounts(source, target)
        remembered = copy_remembered_addresses(source, target)
    except StoreError as exc:
        print(f"mailgate: migrate-store failed: {exc}", file=out)
        return 1
    finally:
        if target is not None:
            target.close()
    print(f"copied {len(names)} account(s) and {remembered} remembered client address(es) from "
          f"{source_file} into the PostgreSQL store" + (f": {', '.join(names)}" if names else ""),
          file=out)
    return 0
