"""PKCE (RFC 7636) and the ``state`` parameter of the authorization-code flow.

The verifier is 64 characters from the unreserved set (RFC 7636 §4.1 allows 43-128); only its
S256 challenge travels in the authorization URL, the verifier itself only in the code exchange.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

VERIFIER_BYTES = 48  # base64url of 48 random bytes = 64 characters
STATE_BYTES = 24
_VERIFIER_RE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")


def b64url(data: bytes) -> str:
    """Unpadded base64url, as used by PKCE and JWT."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_verifier() -> str:
    return b64url(secrets.token_bytes(VERIFIER_BYTES))


def s256_challenge(verifier: str) -> str:
    if not _VERIFIER_RE.match(verifier):
        raise ValueError("a PKCE verifier is 43-128 characters of [A-Za-z0-9-._~]")
    return b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def make_state() -> str:
    return b64url(secrets.token_bytes(STATE_BYTES))
