"""RS256 JSON Web Tokens for the JWT-bearer grant (RFC 7523), e.g. Google service accounts
with domain-wide delegation.

Only what mailgate needs: build and sign ``header.claims.signature`` with ``cryptography``
(PKCS#1 v1.5 padding with SHA-256, RFC 7518 §3.3). No verification: the identity provider
verifies; the tests verify with the public key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .pkce import b64url

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME = 3600  # seconds; Google accepts at most one hour


def _segment(obj: Mapping[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8"))


def sign_rs256(claims: Mapping[str, Any], key: rsa.RSAPrivateKey, *, kid: str | None = None) -> str:
    header: dict[str, Any] = {"alg": "RS256", "typ": "JWT"}
    if kid:
        header["kid"] = kid
    signing_input = f"{_segment(header)}.{_segment(claims)}".encode("ascii")
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode('ascii')}.{b64url(signature)}"


@dataclass(frozen=True)
class ServiceAccountKey:
    """The parts of a Google-style service-account JSON key file that signing needs."""

    client_email: str
    private_key: rsa.RSAPrivateKey
    private_key_id: str | None = None
    token_uri: str | None = None

    @classmethod
    def from_file(cls, path: Path) -> "ServiceAccountKey":
        try:
            data = json.loads(path.read_text("utf-8"))
            email = data["client_email"]
            pem = data["private_key"].encode("ascii")
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise ValueError(
                f"{path}: not a service-account key file (needs client_email and private_key): "
                f"{type(exc).__name__}"
            ) from None
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise ValueError(f"{path}: private_key is not an unencrypted PEM key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path}: private_key must be an RSA key (RS256)")
        return cls(email, key, data.get("private_key_id"), data.get("token_uri"))


def service_account_assertion(
    key: ServiceAccountKey, *, subject: str, scopes: list[str], audience: str, now: int
) -> str:
    """The signed assertion for ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``:
    ``iss`` is the service account, ``sub`` the mailbox user it acts for."""
    claims = {
        "iss": key.client_email,
        "sub": subject,
        "scope": " ".join(scopes),
        "aud": audience,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME,
    }
    return sign_rs256(claims, key.private_key, kid=key.private_key_id)
