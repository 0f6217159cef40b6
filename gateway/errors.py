"""The exceptions mailgate's parts raise to each other.

Every exception here carries a message that is safe to show to an operator (and, where a front
end chooses to, to a client): it never contains a password, token or SASL blob. The front ends map
them to protocol answers:

=========================  ====================================  ===========================
exception                  IMAP answer                           POP3 answer
=========================  ====================================  ===========================
AuthenticationFailed       NO [AUTHENTICATIONFAILED]             -ERR [AUTH]
ReauthorizationRequired    NO [AUTHENTICATIONFAILED] + [ALERT]   -ERR [AUTH] (+ advice)
FeatureRefused             (a ReauthorizationRequired)           (the same)
TemporaryFailure           NO [UNAVAILABLE]                      -ERR [SYS/TEMP]
=========================  ====================================  ===========================
"""

from __future__ import annotations


class MailgateError(Exception):
    """Base class. ``str(exc)`` is a user-facing message without secrets."""


class ConfigError(MailgateError):
    """The configuration is invalid; ``problems`` lists every problem with its key path."""

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class AuthenticationFailed(MailgateError):
    """Unknown user, wrong password or throttled attempt: callers answer all of them alike."""


class ReauthorizationRequired(MailgateError):
    """The upstream grant was revoked or expired; an admin must authorize the account again."""

    def __init__(self, user: str, detail: str = ""):
        self.user = user
        self.hint = f"run: mailgate authorize {user}"
        msg = f"account {user!r} needs to be authorized again ({self.hint})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class FeatureRefused(ReauthorizationRequired):
    """The provider accepted the token but refuses a whole feature for this mailbox: IMAP
    (Microsoft's ``User is authenticated but not connected``: IMAP disabled for the mailbox, a
    wrong ``upstream_user`` or a missing mailbox permission) or SMTP AUTH (``5.7.139``). The
    mailbox's admin must act; ``feature`` is ``"imap"`` or ``"smtp"``."""

    def __init__(self, user: str, feature: str, detail: str = ""):
        super().__init__(user, detail)
        self.feature = feature


class TemporaryFailure(MailgateError):
    """The identity provider or the upstream server is unreachable, failing or too slow."""


class UpstreamError(TemporaryFailure):
    """The upstream IMAP server failed, closed the connection or answered unexpectedly."""
