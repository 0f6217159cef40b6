"""An account's credential record: its local password verifier and its wrapped data key.

These functions are blocking and slow on purpose (argon2, scrypt): async callers run them
through :class:`gateway.oauth.passwords.KdfPool`. They compute records; the caller stores them.

* :func:`new_record` — a new password verifier and a new random data key, wrapped under the
  password (scrypt) or under the daemon key file.
* :func:`unlock` — check a password and return the data key (``None`` for a wrong password).
* :func:`change_password` — new verifier, same data key re-wrapped: sealed tokens survive.
"""

from __future__ import annotations

from dataclasses import replace

from .passwords import hash_password, verify_password
from .sealing import (
    KdfParams,
    SealError,
    derive_kek,
    new_data_key,
    unwrap_data_key,
    wrap_data_key,
)
from .store import AccountRecord


def new_record(
    name: str, provider: str, password: str, *, daemon_key: bytes | None = None
) -> tuple[AccountRecord, bytes]:
    """A fresh record and its (unwrapped) data key."""
    data_key = new_data_key()
    return _wrapped(name, provider, password, data_key, daemon_key), data_key


def _wrapped(
    name: str, provider: str, password: str, data_key: bytes, daemon_key: bytes | None
) -> AccountRecord:
    verifier = hash_password(password)
    if daemon_key is not None:
        wrapped = wrap_data_key(daemon_key, data_key, account=name)
        return AccountRecord(name, provider, verifier, "keyfile", None, wrapped)
    params = KdfParams.new()
    wrapped = wrap_data_key(derive_kek(password, params), data_key, account=name)
    return AccountRecord(name, provider, verifier, "password", params.to_json(), wrapped)


def unlock(record: AccountRecord, password: str, *, daemon_key: bytes | None = None) -> bytes | None:
    """The data key if ``password`` is right, else None. Raises SealError if the password is
    right but the wrapped key does not open (a damaged record, or the wrong daemon key file)."""
    if not verify_password(record.password_hash, password):
        return None
    return unwrap(record, password=password, daemon_key=daemon_key)


def unwrap(
    record: AccountRecord, *, password: str | None = None, daemon_key: bytes | None = None
) -> bytes:
    if record.key_wrapping == "keyfile":
        if daemon_key is None:
            raise SealError(f"account {record.name!r} is sealed with a key file; none configured")
        return unwrap_data_key(daemon_key, record.wrapped_key, account=record.name)
    if password is None or record.kdf is None:
        raise SealError(f"account {record.name!r} is sealed with its local password")
    kek = derive_kek(password, KdfParams.from_json(record.kdf))
    return unwrap_data_key(kek, record.wrapped_key, account=record.name)


def change_password(
    record: AccountRecord, data_key: bytes, new_password: str, *, daemon_key: bytes | None = None
) -> AccountRecord:
    """The record with a new verifier and the same data key wrapped anew."""
    fresh = _wrapped(record.name, record.provider, new_password, data_key, daemon_key)
    return replace(fresh, created=record.created)
