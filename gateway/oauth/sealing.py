"""Sealing secrets at rest: AES-256-GCM under per-account data keys.

Theory of operation
-------------------
Every account has a random 256-bit *data key*. Upstream secrets (refresh tokens) are sealed
with it using AES-256-GCM; the associated data binds each sealed record to its account, its
provider and its kind, so a record copied to another account or provider fails to open
instead of being silently used.

The data key itself is stored only *wrapped* (also AES-256-GCM, associated data = account):

* ``password`` wrapping (the default): the key-encryption key is scrypt(local password, salt).
  A stolen state directory reveals no token without the user's password; the daemon can use
  an account's tokens only after that user has logged in once since it started.
* ``keyfile`` wrapping (opt-in per provider, ``key_file = ...``): the key-encryption key is a
  random key held in a file readable only by the daemon. Tokens can be refreshed unattended
  (client credentials, service accounts, ``mailgate check``), but whoever can read both the
  state directory and the key file can read every token of that provider.

Everything here is pure computation except the two key-file helpers at the end.
Sealed blobs are ``version byte || 12-byte nonce || ciphertext+tag``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

DATA_KEY_BYTES = 32
NONCE_BYTES = 12
BLOB_VERSION = 1
SALT_BYTES = 16
# scrypt cost: ~100 ms here. maxmem must exceed 128 * n * r bytes (32 MiB for these values).
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAXMEM = 64 * 1024 * 1024

_DATA_KEY_AAD = b"mailgate/v1/data-key\x00"
_SECRET_AAD = b"mailgate/v1/secret\x00"


class SealError(Exception):
    """A wrong key, or a record that was tampered with or moved to another account."""


@dataclass(frozen=True)
class KdfParams:
    salt: bytes
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    @classmethod
    def new(cls) -> "KdfParams":
        return cls(salt=secrets.token_bytes(SALT_BYTES))

    def to_json(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        return json.dumps({"alg": "scrypt", "salt": salt, "n": self.n, "r": self.r, "p": self.p})

    @classmethod
    def from_json(cls, text: str) -> "KdfParams":
        data = json.loads(text)
        if data.get("alg") != "scrypt":
            raise SealError(f"unknown key derivation {data.get('alg')!r}")
        return cls(base64.b64decode(data["salt"]), int(data["n"]), int(data["r"]), int(data["p"]))


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=8 * DATA_KEY_BYTES)


def derive_kek(password: str, params: KdfParams) -> bytes:
    """The key-encryption key for password wrapping. Slow on purpose: call it off the event loop."""
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=params.salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=SCRYPT_MAXMEM,
        dklen=DATA_KEY_BYTES,
    )


def _encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return bytes([BLOB_VERSION]) + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < 1 + NONCE_BYTES + 16 or blob[0] != BLOB_VERSION:
        raise SealError("not a sealed record of a known format")
    nonce, body = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
    try:
        return AESGCM(key).decrypt(nonce, body, aad)
    except InvalidTag:
        raise SealError("wrong key, or the record was altered or moved") from None


def _field(value: str) -> bytes:
    return value.encode("utf-8") + b"\x00"


def wrap_data_key(kek: bytes, data_key: bytes, *, account: str) -> bytes:
    return _encrypt(kek, data_key, _DATA_KEY_AAD + _field(account))


def unwrap_data_key(kek: bytes, wrapped: bytes, *, account: str) -> bytes:
    return _decrypt(kek, wrapped, _DATA_KEY_AAD + _field(account))


def _secret_aad(account: str, provider: str, kind: str) -> bytes:
    return _SECRET_AAD + _field(account) + _field(provider) + _field(kind)


def seal(data_key: bytes, plaintext: bytes, *, account: str, provider: str, kind: str) -> bytes:
    return _encrypt(data_key, plaintext, _secret_aad(account, provider, kind))


def unseal(data_key: bytes, blob: bytes, *, account: str, provider: str, kind: str) -> bytes:
    return _decrypt(data_key, blob, _secret_aad(account, provider, kind))


# --- the daemon-held key file (opt-in) ----------------------------------------------------------


def read_key_file(path: Path) -> bytes:
    """Read a key file written by :func:`create_key_file`; refuse one others could read."""
    try:
        st = path.stat()
        text = path.read_text("ascii").strip()
    except OSError as exc:
        raise SealError(f"key file {path}: cannot be read ({exc.strerror})") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SealError(f"key file {path}: readable by others; run: chmod 600 {path}")
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        key = b""
    if len(key) != DATA_KEY_BYTES:
        raise SealError(f"key file {path}: not a mailgate key file (32 bytes, base64)")
    return key


def create_key_file(path: Path) -> bytes:
    """Write a new random key (mode 0600, never overwriting an existing file)."""
    key = new_data_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(base64.b64encode(key).decode("ascii") + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key
