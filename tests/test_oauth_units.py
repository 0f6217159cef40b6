"""Pure parts of the OAuth package: PKCE, JWT, sealing, password cache, parsing, presets."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.oauth import sealing
from gateway.oauth.flows import FlowError, authorization_url, parse_pasted
from gateway.oauth.grants import scopes_for
from gateway.oauth.jwt import ServiceAccountKey, service_account_assertion
from gateway.oauth.passwords import CredentialCache, check_password_policy
from gateway.oauth.pkce import make_state, make_verifier, s256_challenge
from gateway.presets import MICROSOFT_APP_ONLY_SCOPE, PRESETS


def test_pkce_matches_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert s256_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_pkce_verifiers_are_valid_and_distinct() -> None:
    verifiers = {make_verifier() for _ in range(50)}
    assert len(verifiers) == 50
    for v in verifiers:
        assert 43 <= len(v) <= 128
        s256_challenge(v)  # accepted
    assert make_state() != make_state()
    with pytest.raises(ValueError):
        s256_challenge("too-short")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_service_account_jwt_verifies_with_the_public_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({"client_email": "sa@proj.iam", "private_key": pem,
                                "private_key_id": "k1"}))
    sa = ServiceAccountKey.from_file(path)
    token = service_account_assertion(
        sa, subject="bob@example.com", scopes=["https://mail.google.com/"],
        audience="https://oauth2.googleapis.com/token", now=1_700_000_000,
    )
    head, claims, sig = token.split(".")
    assert json.loads(_b64d(head)) == {"alg": "RS256", "kid": "k1", "typ": "JWT"}
    body = json.loads(_b64d(claims))
    assert body["iss"] == "sa@proj.iam" and body["sub"] == "bob@example.com"
    assert body["exp"] - body["iat"] == 3600
    key.public_key().verify(
        _b64d(sig), f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256()
    )


def test_service_account_key_file_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"client_email": "x"}')
    with pytest.raises(ValueError, match="not a service-account key file"):
        ServiceAccountKey.from_file(path)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=2048), st.text(min_size=1, max_size=20))
def test_seal_roundtrip_and_binding(secret: bytes, account: str) -> None:
    key = sealing.new_data_key()
    blob = sealing.seal(key, secret, account=account, provider="p", kind="refresh_token")
    assert sealing.unseal(key, blob, account=account, provider="p", kind="refresh_token") == secret
    if len(secret) >= 8:
        assert secret not in blob
    with pytest.raises(sealing.SealError):
        sealing.unseal(key, blob, account=account + "x", provider="p", kind="refresh_token")
    with pytest.raises(sealing.SealError):
        sealing.unseal(key, blob, account=account, provider="q", kind="refresh_token")
    with pytest.raises(sealing.SealError):
        sealing.unseal(sealing.new_data_key(), blob, account=account, provider="p",
                       kind="refresh_token")


def test_tampered_blob_does_not_open() -> None:
    key = sealing.new_data_key()
    blob = bytearray(sealing.seal(key, b"token", account="a", provider="p", kind="k"))
    blob[-1] ^= 1
    with pytest.raises(sealing.SealError):
        sealing.unseal(key, bytes(blob), account="a", provider="p", kind="k")
    with pytest.raises(sealing.SealError):
        sealing.unseal(key, b"\x01short", account="a", provider="p", kind="k")


def test_password_wrapping_needs_the_password() -> None:
    params = sealing.KdfParams.new()
    data_key = sealing.new_data_key()
    wrapped = sealing.wrap_data_key(sealing.derive_kek("pw-one-1", params), data_key, account="a")
    again = sealing.KdfParams.from_json(params.to_json())
    assert sealing.unwrap_data_key(sealing.derive_kek("pw-one-1", again), wrapped,
                                   account="a") == data_key
    with pytest.raises(sealing.SealError):
        sealing.unwrap_data_key(sealing.derive_kek("pw-two-2", again), wrapped, account="a")


def test_key_file_is_private_and_refused_when_readable(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "daemon.key"
    key = sealing.create_key_file(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert sealing.read_key_file(path) == key
    with pytest.raises(FileExistsError):
        sealing.create_key_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(sealing.SealError, match="chmod 600"):
        sealing.read_key_file(path)


def test_credential_cache_expires_bounds_and_binds_the_verifier() -> None:
    now = [0.0]
    cache = CredentialCache(max_entries=2, ttl=10, clock=lambda: now[0])
    cache.remember("alice", "pw", "$argon2$v1")
    assert cache.check("alice", "pw", "$argon2$v1")
    assert not cache.check("alice", "other", "$argon2$v1")
    assert not cache.check("bob", "pw", "$argon2$v1")
    assert not cache.check("alice", "pw", "$argon2$v2")  # password changed meanwhile
    now[0] = 10.5
    assert not cache.check("alice", "pw", "$argon2$v1")
    for user in ("a", "b", "c"):
        cache.remember(user, "pw", "v")
    assert len(cache) == 2 and not cache.check("a", "pw", "v") and cache.check("c", "pw", "v")


def test_password_policy() -> None:
    check_password_policy("eight ch")
    for bad in ("short", "x" * 2000, "with\nnewline"):
        with pytest.raises(ValueError):
            check_password_policy(bad)


def test_parse_pasted_redirects() -> None:
    assert parse_pasted("http://127.0.0.1/?code=abc&state=s1", state="s1") == "abc"
    assert parse_pasted("  bare-code-123 \n", state="s1") == "bare-code-123"
    assert parse_pasted("?code=abc&state=s1", state="s1") == "abc"
    with pytest.raises(FlowError, match="state mismatch"):
        parse_pasted("http://127.0.0.1/?code=abc&state=evil", state="s1")
    with pytest.raises(FlowError, match="access_denied"):
        parse_pasted("http://127.0.0.1/?error=access_denied&state=s1", state="s1")


def _provider(table: dict, name: str = "p"):
    raw = {"providers": {name: table}}
    return parse_config(raw, base_dir=Path("/tmp")).providers[name]


def test_every_preset_is_a_valid_provider_with_a_client_id() -> None:
    for name, preset in PRESETS.items():
        provider = _provider({"client_id": "id"}, name)
        assert provider.token_url.startswith("https://")
        assert provider.imap_port == 993
        assert provider.scopes == preset["scopes"]


def test_microsoft_tenant_and_app_only_scope() -> None:
    provider = _provider({"preset": "microsoft365", "client_id": "id", "tenant": "contoso.com",
                          "flow": "client_credentials", "client_secret": "s"})
    assert provider.token_url == "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token"
    assert scopes_for(provider) == [MICROSOFT_APP_ONLY_SCOPE]
    delegated = _provider({"preset": "microsoft365", "client_id": "id"})
    assert "offline_access" in scopes_for(delegated)
    assert "/organizations/" in delegated.authorize_url


def test_a_preset_key_can_be_overridden_and_flows_are_checked() -> None:
    provider = _provider({"preset": "gmail", "client_id": "id", "imap": "127.0.0.1:1993"})
    assert provider.imap_host == "127.0.0.1" and provider.sasl == "xoauth2"
    with pytest.raises(ConfigError, match="client_secret"):
        _provider({"preset": "microsoft365", "client_id": "id", "flow": "client_credentials"})


def test_authorization_url_carries_pkce_and_the_preset_params() -> None:
    provider = _provider({"preset": "gmail", "client_id": "id"})
    url = authorization_url(provider, redirect_uri="http://127.0.0.1:5/", state="st",
                            verifier=make_verifier(), login_hint="a@b.c")
    assert url.startswith("https://accounts.google.com/o/oauth2/v2/auth?")
    for part in ("code_challenge_method=S256", "access_type=offline", "state=st",
                 "scope=https%3A%2F%2Fmail.google.com%2F", "login_hint=a%40b.c"):
        assert part in url
