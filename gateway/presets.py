"""Built-in provider presets: plain data merged under each ``[providers.X]`` table.

``gateway.config`` takes the preset named by ``preset = "..."`` (or by the table's own name),
lays the admin's keys over it and validates the result as a ``ProviderConfig``. A preset holds
only public facts (hosts, endpoints, scopes, SASL mechanism); the admin always supplies the
``client_id`` (and ``client_secret``) of their own app registration. ``{tenant}`` in an endpoint
is replaced by the provider's ``tenant`` key (default ``organizations``).

Sources: Google's XOAUTH2 and OAuth 2.0 for desktop apps documentation; Microsoft identity
platform v2.0 endpoints and "Authenticate an IMAP, POP or SMTP connection using OAuth"; the
provider tables of Thunderbird and other open-source mail clients for Yahoo, AOL and Fastmail.
The sovereign Microsoft clouds: Microsoft Entra "National clouds" (authorities) and the
Microsoft 365 endpoint lists for GCC High, DoD and 21Vianet (IMAP hosts); their IMAP scopes are
what open-source clients use, not stated by Microsoft (docs/providers.md marks them UNCONFIRMED;
override ``scopes`` if a tenant needs others).
"""

from __future__ import annotations

from typing import Any

GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
MICROSOFT_LOGIN = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
MICROSOFT_IMAP_SCOPE = "https://outlook.office.com/IMAP.AccessAsUser.All"
MICROSOFT_POP_SCOPE = "https://outlook.office.com/POP.AccessAsUser.All"
# SMTP AUTH with OAuth (docs/smtp.md); a grant made without it cannot send.
MICROSOFT_SMTP_SCOPE = "https://outlook.office.com/SMTP.Send"
# App-only (client credentials) access to Exchange Online mailboxes.
MICROSOFT_APP_ONLY_SCOPE = "https://outlook.office365.com/.default"
# Google Workspace domain-wide delegation (flow "service_account") may ask for this scope
# instead of https://mail.google.com/: every label and message is visible over IMAP.
GMAIL_IMAP_ADMIN_SCOPE = "https://www.googleapis.com/auth/gmail.imap_admin"

# Microsoft 365 GCC High and DoD (Azure Government identity) and Microsoft 365 operated by
# 21Vianet (China): their own authorities, IMAP hosts and Exchange resources.
US_GOVERNMENT_LOGIN = "https://login.microsoftonline.us/{tenant}/oauth2/v2.0"
US_GOVERNMENT_EXCHANGE = "https://outlook.office365.us"
CHINA_LOGIN = "https://login.partner.microsoftonline.cn/{tenant}/oauth2/v2.0"
CHINA_EXCHANGE = "https://partner.outlook.cn"


def _microsoft_cloud(login: str, imap: str, exchange: str) -> dict[str, Any]:
    return {
        "kind": "microsoft365",
        "imap": imap,
        "imap_tls": "implicit",
        "sasl": "xoauth2",
        "flow": "authorization_code",
        "tenant": "organizations",
        "authorize_url": login + "/authorize",
        "token_url": login + "/token",
        "device_url": login + "/devicecode",
        "scopes": [exchange + "/IMAP.AccessAsUser.All", exchange + "/POP.AccessAsUser.All",
                   "offline_access"],
    }


PRESETS: dict[str, dict[str, Any]] = {
    "gmail": {
        "kind": "gmail",
        "imap": "imap.gmail.com:993",
        "imap_tls": "implicit",
        "smtp": "smtp.gmail.com:465",
        "smtp_tls": "implicit",
        "sasl": "xoauth2",
        "flow": "authorization_code",
        "authorize_url": "https://accounts.google.com/o/oauth2/v2/auth",
        "token_url": GOOGLE_TOKEN_URL,
        "scopes": ["https://mail.google.com/"],
        # Without these Google returns no refresh token on a repeated consent.
        "authorize_params": {"access_type": "offline", "prompt": "consent"},
    },
    "microsoft365": {
        "kind": "microsoft365",
        "imap": "outlook.office365.com:993",
        "imap_tls": "implicit",
        "smtp": "smtp.office365.com:587",
        "smtp_tls": "starttls",
        "sasl": "xoauth2",
        "flow": "authorization_code",
        "tenant": "organizations",
        "authorize_url": MICROSOFT_LOGIN + "/authorize",
        "token_url": MICROSOFT_LOGIN + "/token",
        "device_url": MICROSOFT_LOGIN + "/devicecode",
        "scopes": [MICROSOFT_IMAP_SCOPE, MICROSOFT_POP_SCOPE, MICROSOFT_SMTP_SCOPE, "offline_access"],
    },
    "outlook": {
        # Consumer accounts (outlook.com, hotmail.com, live.com).
        "kind": "outlook",
        "imap": "outlook.office365.com:993",
        "imap_tls": "implicit",
        "smtp": "smtp-mail.outlook.com:587",
        "smtp_tls": "starttls",
        "sasl": "xoauth2",
        "flow": "authorization_code",
        "tenant": "consumers",
        "authorize_url": MICROSOFT_LOGIN + "/authorize",
        "token_url": MICROSOFT_LOGIN + "/token",
        "device_url": MICROSOFT_LOGIN + "/devicecode",
        "scopes": [MICROSOFT_IMAP_SCOPE, MICROSOFT_POP_SCOPE, MICROSOFT_SMTP_SCOPE, "offline_access"],
    },
    "microsoft365_gcchigh": _microsoft_cloud(
        US_GOVERNMENT_LOGIN, "outlook.office365.us:993", US_GOVERNMENT_EXCHANGE),
    "microsoft365_dod": _microsoft_cloud(
        US_GOVERNMENT_LOGIN, "outlook-dod.office365.us:993", US_GOVERNMENT_EXCHANGE),
    "microsoft365_china": _microsoft_cloud(CHINA_LOGIN, "partner.outlook.cn:993", CHINA_EXCHANGE),
    "yahoo": {
        "kind": "yahoo",
        "imap": "imap.mail.yahoo.com:993",
        "imap_tls": "implicit",
        "sasl": "xoauth2",
        "flow": "authorization_code",
        "authorize_url": "https://api.login.yahoo.com/oauth2/request_auth",
        "token_url": "https://api.login.yahoo.com/oauth2/get_token",
        "scopes": ["mail-w"],
    },
    "aol": {
        "kind": "aol",
        "imap": "imap.aol.com:993",
        "imap_tls": "implicit",
        "sasl": "xoauth2",
        "flow": "authorization_code",
        "authorize_url": "https://api.login.aol.com/oauth2/request_auth",
        "token_url": "https://api.login.aol.com/oauth2/get_token",
        "scopes": ["mail-w"],
    },
    "fastmail": {
        "kind": "fastmail",
        "imap": "imap.fastmail.com:993",
        "imap_tls": "implicit",
        "sasl": "xoauth2",
        "flow": "authorization_code",
        "authorize_url": "https://api.fastmail.com/oauth/authorize",
        "token_url": "https://api.fastmail.com/oauth/refresh",
        "scopes": [
            "https://www.fastmail.com/dev/protocol-imap",
            "https://www.fastmail.com/dev/protocol-pop",
        ],
    },
}
