"""SASL messages, sans-IO: what mailgate sends upstream and what it decodes from its clients.

Theory of operation
-------------------
SASL (RFC 4422) is a challenge/response exchange; every message travels base64-encoded on one
protocol line (IMAP ``AUTHENTICATE``, POP3 ``AUTH``). This module only builds and parses the
*decoded* messages and does the base64 step; the front ends and the upstream client decide when
a message is sent or expected.

Upstream direction (mailgate is the SASL client, authenticating with an OAuth 2.0 token):

* ``xoauth2_initial_response(user, token)`` — Google's XOAUTH2:
  ``user=U ^A auth=Bearer T ^A ^A`` (also used by Microsoft 365 and Dovecot).
* ``oauthbearer_initial_response(user, token, host, port)`` — RFC 7628 OAUTHBEARER:
  ``n,a=U, ^A host=H ^A port=P ^A auth=Bearer T ^A ^A``.
* On a rejected token the server sends a continuation carrying base64 JSON
  (``{"status":"401","schemes":"bearer","scope":"mail"}`` from Gmail/Dovecot,
  ``{"status":"invalid_token"}`` for OAUTHBEARER). ``decode_oauth_error`` turns it into an
  :class:`OAuthError`; the client must then answer with :func:`oauth_error_reply` (an empty
  message for XOAUTH2, ``^A`` for OAUTHBEARER) and receives the final ``NO``.

Client direction (mailgate is the SASL server, checking a local password):

* ``decode_plain(b64)`` — RFC 4616 PLAIN: ``[authzid] NUL authcid NUL passwd``.
* ``decode_login_step(b64)`` — the two-step LOGIN mechanism (username, then password), with
  the conventional challenges :data:`LOGIN_USERNAME_CHALLENGE` / :data:`LOGIN_PASSWORD_CHALLENGE`.

``SASLError`` (a ``ValueError``) is the only exception raised for bad input. Its message never
contains the decoded data: SASL blobs carry passwords and tokens.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "LOGIN_PASSWORD_CHALLENGE",
    "LOGIN_USERNAME_CHALLENGE",
    "MAX_SASL_MESSAGE",
    "OAuthError",
    "PlainCredentials",
    "SASLError",
    "b64decode",
    "b64encode",
    "decode_login_step",
    "decode_oauth_error",
    "decode_plain",
    "oauth_error_reply",
    "oauthbearer_initial_response",
    "xoauth2_initial_response",
]

#: Largest decoded SASL message accepted from a client (Dovecot's SASL buffer is 8192 too).
MAX_SASL_MESSAGE = 8192

#: base64 of ``Username:`` / ``Password:``, the challenges every LOGIN implementation sends.
LOGIN_USERNAME_CHALLENGE = b"VXNlcm5hbWU6"
LOGIN_PASSWORD_CHALLENGE = b"UGFzc3dvcmQ6"

#: The OAuth error ``status`` values that mean "this token is not (or no longer) valid".
_TOKEN_REJECTED_STATUSES = frozenset({"400", "401", "invalid_token"})

_SEP = b"\x01"


class SASLError(ValueError):
    """Malformed SASL input. The message describes the problem, never the data."""


Mechanism = Literal["xoauth2", "oauthbearer"]


@dataclass(frozen=True, slots=True)
class PlainCredentials:
    """A decoded RFC 4616 PLAIN message. ``authzid`` is ``""`` when the client sent none."""

    authzid: str
    authcid: str
    password: str

    def __repr__(self) -> str:  # never show the password
        return f"PlainCredentials(authzid={self.authzid!r}, authcid={self.authcid!r}, password=***)"


@dataclass(frozen=True, slots=True)
class OAuthError:
    """The JSON error a server sends in place of success for XOAUTH2/OAUTHBEARER."""

    status: str
    schemes: str | None = None
    scope: str | None = None

    @property
    def token_rejected(self) -> bool:
        """True if the server says the token itself is bad (refreshing it may help)."""
        return self.status in _TOKEN_REJECTED_STATUSES


# --------------------------------------------------------------------------- base64


def b64encode(data: bytes) -> bytes:
    """Encode one SASL message for the wire; the empty message is ``=`` (RFC 4959)."""
    return base64.b64encode(data) if data else b"="


def b64decode(b64: bytes | str, *, max_size: int = MAX_SASL_MESSAGE) -> bytes:
    """Strictly decode one SASL message from the wire (``=`` is the empty message).

    Surrounding whitespace (a left-over CRLF) is ignored; anything else that is not canonical
    base64 raises :class:`SASLError`.
    """
    if isinstance(b64, str):
        try:
            b64 = b64.encode("ascii")
        except UnicodeEncodeError:
            raise SASLError("SASL message is not base64") from None
    b64 = b64.strip(b" \t\r\n")
    if b64 in (b"", b"="):
        return b""
    if len(b64) > (max_size + 2) // 3 * 4:
        raise SASLError("SASL message is too long")
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("SASL message is not valid base64") from None


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(f"SASL {what} is not valid UTF-8") from None


# --------------------------------------------------------------------------- upstream (OAuth)


def _check_field(value: str, what: str, forbidden: str = "\x01") -> None:
    if any(ch in value for ch in forbidden) or any(ch in value for ch in "\r\n\x00"):
        raise SASLError(f"{what} contains a character SASL cannot carry")


def xoauth2_initial_response(user: str, token: str) -> bytes:
    """The decoded XOAUTH2 message: ``user=U\\x01auth=Bearer T\\x01\\x01``."""
    _check_field(user, "user name")
    _check_field(token, "access token", forbidden="\x01 ")
    return b"user=" + user.encode() + _SEP + b"auth=Bearer " + token.encode() + _SEP + _SEP


def _saslname(user: str) -> bytes:
    """RFC 5801 saslname escaping used by the GS2 header: ``,`` → ``=2C``, ``=`` → ``=3D``."""
    return user.replace("=", "=3D").replace(",", "=2C").encode()


def oauthbearer_initial_response(user: str, token: str, host: str, port: int) -> bytes:
    """The decoded RFC 7628 OAUTHBEARER message with GS2 header, host, port and token."""
    _check_field(user, "user name")
    _check_field(host, "host name")
    _check_field(token, "access token", forbidden="\x01 ")
    if not 0 < port < 65536:
        raise SASLError("port is out of range")
    return (
        b"n,a=" + _saslname(user) + b"," + _SEP
        + b"host=" + host.encode() + _SEP
        + b"port=" + str(port).encode() + _SEP
        + b"auth=Bearer " + token.encode() + _SEP + _SEP
    )  # fmt: skip


def decode_oauth_error(b64: bytes | str) -> OAuthError:
    """Decode the base64 JSON error challenge a server sends when it rejects a token."""
    raw = b64decode(b64)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise SASLError("OAuth error challenge is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("status"), (str, int)):
        raise SASLError("OAuth error challenge has no status")

    def text(key: str) -> str | None:
        value = doc.get(key)
        return value if isinstance(value, str) else None

    return OAuthError(status=str(doc["status"]), schemes=text("schemes"), scope=text("scope"))


def oauth_error_reply(mechanism: Mechanism) -> bytes:
    """The wire line (base64, no CRLF) a client sends after an OAuth error challenge."""
    return b"" if mechanism == "xoauth2" else b64encode(_SEP)


# --------------------------------------------------------------------------- client side


def decode_plain(b64: bytes | str) -> PlainCredentials:
    """Decode an RFC 4616 PLAIN message (base64 as received) into its three fields."""
    fields = b64decode(b64).split(b"\x00")
    if len(fields) != 3:
        raise SASLError("PLAIN message must have exactly three NUL-separated fields")
    authzid, authcid, password = (_utf8(f, "PLAIN field") for f in fields)
    if not authcid:
        raise SASLError("PLAIN message has an empty user name")
    if not password:
        raise SASLError("PLAIN message has an empty password")
    return PlainCredentials(authzid=authzid, authcid=authcid, password=password)


def decode_login_step(b64: bytes | str) -> str:
    """Decode one answer of the LOGIN mechanism (the user name, then the password)."""
    value = _utf8(b64decode(b64), "LOGIN answer")
    if not value or "\x00" in value:
        raise SASLError("LOGIN answer is empty or contains NUL")
    return value
