"""What the providers' SMTP answers mean, and what the administrator should do about them.

Theory of operation
-------------------
One table, :data:`ANSWERS`, read top to bottom; the first row whose code, enhanced code and
text all match a reply explains it. Each row says what the answer means for mailgate
(:class:`Meaning`) and gives the advice that goes into the log line and onto the status page.
Nothing here does I/O; :func:`explain` is called by the upstream SMTP client
(:mod:`gateway.upstream.smtp`) for its login and by the front end for refused transactions.

=====================  =========================================  ===============================
answer                 who sends it / why                         meaning
=====================  =========================================  ===============================
``5.7.139``            Microsoft 365: SMTP AUTH disabled for the  permanent (admin must enable)
                       mailbox or the tenant
``5.7.30``             Microsoft 365: basic authentication        permanent
                       refused (the client did not use OAuth)
``5.7.60``,            Microsoft 365: the sender address is not   permanent (per message)
``SendAsDenied``       the mailbox's and it has no Send As right
``535 5.7.3``          Microsoft 365: token not accepted (often   token rejected: refresh once
                       a grant without ``SMTP.Send``)
``535 5.7.8``          Gmail (and Dovecot): token not accepted    token rejected: refresh once
``530 5.7.0``          Gmail: authentication/TLS required first   permanent (configuration)
``454``, ``4.7.0``     temporary authentication failure           temporary
``4.7.x``              throttling, rate limits                    temporary
``421``                the server is closing the connection       temporary
=====================  =========================================  ===============================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..protocol.smtp import Reply

__all__ = ["ANSWERS", "SMTP_AUTH_DISABLED", "Explanation", "Meaning", "explain"]


class Meaning(enum.Enum):
    TOKEN_REJECTED = "token_rejected"  # a fresh token may help (once)
    PERMANENT = "permanent"  # retrying will not help until the administrator acts
    TEMPORARY = "temporary"  # try again later


@dataclass(frozen=True)
class Explanation:
    key: str  # short, stable name (metrics, events)
    meaning: Meaning
    advice: str


@dataclass(frozen=True)
class _Row:
    code: int | None  # the reply code, or any
    enhanced: str | None  # an enhanced code or its prefix ("4.7."), or any
    text: str | None  # a phrase in the reply text (case-insensitive), or any
    explanation: Explanation


def _row(code: int | None, enhanced: str | None, text: str | None, key: str, meaning: Meaning,
         advice: str) -> _Row:
    return _Row(code, enhanced, text, Explanation(key, meaning, advice))


M365_SMTP_SCOPE = "https://outlook.office.com/SMTP.Send"
#: The key of Microsoft 365's "SMTP AUTH is disabled for the mailbox" (5.7.139): a refused feature.
SMTP_AUTH_DISABLED = "smtp_auth_disabled"

ANSWERS: tuple[_Row, ...] = (
    _row(None, "5.7.139", None, SMTP_AUTH_DISABLED, Meaning.PERMANENT,
         "Microsoft 365 has SMTP AUTH switched off for this mailbox or the whole tenant: enable "
         "'Authenticated SMTP' for the mailbox (Set-CASMailbox -SmtpClientAuthenticationDisabled "
         "$false) and check the tenant default (Set-TransportConfig)"),
    _row(None, "5.7.30", None, "basic_auth_refused", Meaning.PERMANENT,
         "Microsoft 365 refuses basic authentication for client submission; check that the "
         "provider uses sasl = \"xoauth2\" and the account was authorized with OAuth"),
    _row(None, "5.7.60", None, "send_as_denied", Meaning.PERMANENT,
         "the provider refused the sender address: the mailbox may only send as its own "
         "address (upstream_user) unless it has Send As rights for the other one"),
    _row(None, None, "sendasdenied", "send_as_denied", Meaning.PERMANENT,
         "the provider refused the sender address: the mailbox may only send as its own "
         "address (upstream_user) unless it has Send As rights for the other one"),
    _row(535, "5.7.3", None, "token_rejected", Meaning.TOKEN_REJECTED,
         "Microsoft 365 did not accept the token: re-authorize to send (the grant needs the "
         f"{M365_SMTP_SCOPE} scope) and check that upstream_user is the mailbox's address"),
    _row(535, "5.7.8", None, "token_rejected", Meaning.TOKEN_REJECTED,
         "the provider did not accept the token: re-authorize the account (for Gmail the grant "
         "needs the https://mail.google.com/ scope) and check upstream_user"),
    _row(530, "5.7.0", None, "auth_required", Meaning.PERMANENT,
         "the provider wants authentication or TLS before this command: check the provider's "
         "smtp and smtp_tls settings"),
    _row(454, None, None, "temporary_auth_failure", Meaning.TEMPORARY,
         "the provider could not check the token right now; mailgate's clients are told to "
         "try again later"),
    _row(None, "4.7.", None, "throttled", Meaning.TEMPORARY,
         "the provider is throttling this account (rate or concurrency limit); clients retry "
         "later -- lower limits.smtp_messages_per_user_per_hour or "
         "limits.smtp_upstream_connections_per_account if it persists"),
    _row(421, None, None, "service_unavailable", Meaning.TEMPORARY,
         "the provider closed the connection (service not available or throttling); clients "
         "retry later"),
)


def explain(reply: Reply) -> Explanation | None:
    """The first row of :data:`ANSWERS` that matches ``reply``, if any."""
    enhanced = reply.enhanced or ""
    text = " ".join(reply.lines).lower()
    for row in ANSWERS:
        if row.code is not None and row.code != reply.code:
            continue
        if row.enhanced is not None and not (
            enhanced == row.enhanced or (row.enhanced.endswith(".") and enhanced.startswith(row.enhanced))
            or f" {row.enhanced} " in f" {text} "
        ):
            continue
        if row.text is not None and row.text not in text:
            continue
        return row.explanation
    return None
