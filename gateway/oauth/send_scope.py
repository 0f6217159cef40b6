"""Whether an account's stored grant can send mail (SMTP), from the scope the IdP granted.

Theory of operation
-------------------
Microsoft 365 needs the ``https://outlook.office.com/SMTP.Send`` scope for SMTP AUTH; the
preset asks for it now, but a grant made before does not have it, and the provider then refuses
every login to its SMTP server (``535 5.7.3``). The administrator should learn that from
``mailgate check`` and the status page -- "re-authorize to send" -- not from a user's failed
message.

* At authorize time (:func:`gateway.oauth.lifecycle.authorize_account`) the scope the IdP
  granted is stored beside the account's sealed secrets, as a row of kind
  :data:`GRANTED_SCOPE`: the token response's ``scope``, or the requested scopes when the
  response has none (RFC 6749 §5.1: omitted when it is what was asked). A scope is not a
  secret: the row holds the plain string.
* :func:`send_scope_problem` compares it with the scopes sending needs
  (:data:`SEND_SCOPES`, only those the provider's configuration asks for): a missing row means
  the account was authorized before scopes were recorded, hence before the send scope was
  asked for.

Blocking store reads: callers run :func:`send_scope_problem` in a worker thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..presets import MICROSOFT_SMTP_SCOPE

if TYPE_CHECKING:
    from ..config import ProviderConfig
    from ..ports import CredentialStore

__all__ = ["GRANTED_SCOPE", "SEND_SCOPES", "REAUTHORIZE_TO_SEND", "send_scope_problem"]

#: The store row (``secrets`` kind) holding the scope string the IdP granted.
GRANTED_SCOPE = "granted_scope"
#: Scopes without which a grant cannot send, when the provider's configuration asks for them.
SEND_SCOPES = frozenset({MICROSOFT_SMTP_SCOPE})
REAUTHORIZE_TO_SEND = "re-authorize to send"


def send_scope_problem(store: CredentialStore, name: str, provider: ProviderConfig) -> str | None:
    """Why ``name``'s stored grant cannot send through ``provider``, or None."""
    needed = SEND_SCOPES.intersection(provider.scopes)
    if provider.smtp is None or not needed:
        return None
    row = store.secret(name, GRANTED_SCOPE)
    if row is None:
        if store.secret(name) is None:
            return None  # not authorized at all: reported as such elsewhere
        return (f"{REAUTHORIZE_TO_SEND}: authorized before mailgate asked for "
                f"{', '.join(sorted(needed))} (run: mailgate authorize {name})")
    granted = set(row.sealed.decode("utf-8", "replace").split())
    missing = needed - granted
    if missing:
        return (f"{REAUTHORIZE_TO_SEND}: the grant lacks {', '.join(sorted(missing))} "
                f"(run: mailgate authorize {name})")
    return None
