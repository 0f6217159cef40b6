"""Byte-exact and property tests for gateway.protocol.sasl."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol import sasl
from gateway.protocol.sasl import SASLError

# ---------------------------------------------------------------- upstream messages


def test_xoauth2_exact_bytes() -> None:
    # The example from Google's XOAUTH2 documentation.
    msg = sasl.xoauth2_initial_response("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")
    assert msg == b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
    assert base64.b64encode(msg) == (
        b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52"
        b"YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
    )


def test_oauthbearer_exact_bytes() -> None:
    # RFC 7628 section 4.1.
    msg = sasl.oauthbearer_initial_response("user@example.com", "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==", "server.example.com", 143)
    assert msg == (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
        b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
    )


def test_oauthbearer_escapes_authzid() -> None:
    msg = sasl.oauthbearer_initial_response("a,b=c", "t", "h", 993)
    assert msg.startswith(b"n,a=a=2Cb=3Dc,\x01")


@pytest.mark.parametrize("user", ["a\x01b", "a\r\nb", "a\x00"])
def test_upstream_messages_refuse_separator_characters(user: str) -> None:
    with pytest.raises(SASLError):
        sasl.xoauth2_initial_response(user, "tok")
    with pytest.raises(SASLError):
        sasl.oauthbearer_initial_response(user, "tok", "h", 993)


def test_upstream_messages_refuse_bad_token_and_port() -> None:
    with pytest.raises(SASLError):
        sasl.xoauth2_initial_response("u", "to ken")
    with pytest.raises(SASLError):
        sasl.oauthbearer_initial_response("u", "tok", "h", 0)


# ---------------------------------------------------------------- error challenges


def test_decode_dovecot_xoauth2_error() -> None:
    err = sasl.decode_oauth_error(b"eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=")
    assert err == sasl.OAuthError(status="401", schemes="bearer", scope="mail")
    assert err.token_rejected


def test_decode_oauthbearer_error_and_replies() -> None:
    err = sasl.decode_oauth_error("eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=")
    assert err == sasl.OAuthError(status="invalid_token")
    assert err.token_rejected
    assert sasl.oauth_error_reply("oauthbearer") == b"AQ=="
    assert sasl.oauth_error_reply("xoauth2") == b""


def test_decode_gmail_error_and_non_token_status() -> None:
    gmail = base64.b64encode(b'{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}')
    assert sasl.decode_oauth_error(gmail).token_rejected
    other = base64.b64encode(b'{"status":"insufficient_scope","scope":"x"}')
    assert not sasl.decode_oauth_error(other).token_rejected


@pytest.mark.parametrize("blob", [b"bm90IGpzb24=", base64.b64encode(b"[1,2]"), base64.b64encode(b'{"x":1}'), b"!!"])
def test_decode_oauth_error_rejects_garbage(blob: bytes) -> None:
    with pytest.raises(SASLError):
        sasl.decode_oauth_error(blob)


# ---------------------------------------------------------------- PLAIN / LOGIN


def test_decode_plain_rfc4616_examples() -> None:
    creds = sasl.decode_plain(base64.b64encode(b"\x00tim\x00tanstaaftanstaaf"))
    assert creds == sasl.PlainCredentials(authzid="", authcid="tim", password="tanstaaftanstaaf")
    creds = sasl.decode_plain(base64.b64encode(b"Ursel\x00Kurt\x00xipj3plmq"))
    assert (creds.authzid, creds.authcid, creds.password) == ("Ursel", "Kurt", "xipj3plmq")
    assert "xipj3plmq" not in repr(creds)


def test_decode_plain_utf8_and_trailing_crlf() -> None:
    raw = "\x00jürgen\x00pässwörd €".encode()
    assert sasl.decode_plain(base64.b64encode(raw) + b"\r\n").password == "pässwörd €"


@pytest.mark.parametrize(
    "raw",
    [b"", b"user\x00pass", b"\x00\x00pw", b"\x00user\x00", b"a\x00b\x00c\x00d", b"\x00u\x00\xff\xfe"],
)
def test_decode_plain_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(SASLError):
        sasl.decode_plain(base64.b64encode(raw))


def test_decode_plain_rejects_bad_base64_and_oversize() -> None:
    for blob in (b"AA=A", b"%%%%", "ü", b"AAA"):
        with pytest.raises(SASLError):
            sasl.decode_plain(blob)
    with pytest.raises(SASLError, match="too long"):
        sasl.decode_plain(base64.b64encode(b"\x00u\x00" + b"p" * sasl.MAX_SASL_MESSAGE))


def test_login_steps() -> None:
    assert base64.b64decode(sasl.LOGIN_USERNAME_CHALLENGE) == b"Username:"
    assert base64.b64decode(sasl.LOGIN_PASSWORD_CHALLENGE) == b"Password:"
    assert sasl.decode_login_step(base64.b64encode(b"alice")) == "alice"
    for bad in (b"=", b"", base64.b64encode(b"a\x00b")):
        with pytest.raises(SASLError):
            sasl.decode_login_step(bad)


def test_empty_message_encoding() -> None:
    assert sasl.b64encode(b"") == b"="
    assert sasl.b64decode(b"=") == b""


# ---------------------------------------------------------------- properties

_field = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=200)


@given(authzid=_field, authcid=_field.filter(bool), password=_field.filter(bool))
def test_plain_round_trip(authzid: str, authcid: str, password: str) -> None:
    wire = sasl.b64encode(f"{authzid}\x00{authcid}\x00{password}".encode())
    assert sasl.decode_plain(wire) == sasl.PlainCredentials(authzid, authcid, password)


@given(st.lists(st.text(max_size=20) | st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
                min_size=1, max_size=4))
def test_plain_accepts_exactly_the_rfc4616_shape(fields: list[str]) -> None:
    """authzid NUL authcid NUL passwd, authcid and passwd non-empty (RFC 4616 ``1*SAFE``)."""
    message = "\x00".join(fields)
    wire = base64.b64encode(message.encode("utf-8"))
    parts = message.split("\x00")
    if len(parts) == 3 and parts[1] and parts[2]:
        assert sasl.decode_plain(wire) == sasl.PlainCredentials(*parts)
    else:
        with pytest.raises(SASLError):
            sasl.decode_plain(wire)


@given(value=_field.filter(bool))
def test_login_round_trip(value: str) -> None:
    assert sasl.decode_login_step(sasl.b64encode(value.encode())) == value


@given(user=st.text(st.characters(blacklist_characters="\x00\x01\r\n", blacklist_categories=("Cs",)), max_size=64),
       token=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=300))
def test_xoauth2_fields_round_trip(user: str, token: str) -> None:
    msg = sasl.xoauth2_initial_response(user, token)
    user_field, auth_field, empty1, empty2 = msg.split(b"\x01")
    assert (user_field, auth_field, empty1, empty2) == (b"user=" + user.encode(), b"auth=Bearer " + token.encode(), b"", b"")


@given(st.binary(max_size=400))
def test_random_bytes_only_raise_sasl_error(blob: bytes) -> None:
    for decoder in (sasl.decode_plain, sasl.decode_login_step, sasl.decode_oauth_error, sasl.b64decode):
        for wire in (blob, base64.b64encode(blob)):
            try:
                decoder(wire)
            except SASLError:
                pass
