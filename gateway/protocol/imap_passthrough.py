"""The relay's policy for the upstream → client IMAP stream after login, sans-IO.

Theory of operation
-------------------
After login, mailgate relays the upstream server's bytes to the client almost untouched. The
reading is done by the one response reader, in its relay mode
(:class:`gateway.protocol.imap_responses.ResponseScanner`: response boundaries, ``+``, tagged
completions, ``* BYE``, literals skipped unread). This module adds what the relay decides on
top of it: which capabilities a logged-in client may see. A client must never see ``AUTH=*``,
``SASL-IR``, ``STARTTLS``, ``LOGINDISABLED`` after login, nor ``COMPRESS=DEFLATE`` (mailgate
does not relay compressed streams), and it sees ``LITERAL+`` in place of ``LITERAL-`` because
mailgate converts large non-synchronizing literals itself (see
:mod:`gateway.protocol.imap_commands`).

:class:`ResponseScanner` here is the reader's relay mode with that policy applied to every
``* CAPABILITY …`` line and ``[CAPABILITY …]`` code; :func:`client_capabilities` gives the same
list for a capability set the upstream client already holds.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Final

from . import imap_responses
from .imap_grammar import ProtocolError
from .imap_responses import DEFAULT_MAX_LINE, Bye, Continuation, Item, Tagged, rewrite_capabilities

__all__ = [
    "DEFAULT_MAX_LINE",
    "Bye",
    "Continuation",
    "Item",
    "ProtocolError",
    "ResponseScanner",
    "Tagged",
    "client_capabilities",
    "rewrite_capability_line",
]

#: Capabilities a client must not see after login (an entry ending in "=" is a prefix).
POST_LOGIN_DROP: Final = (
    b"AUTH=", b"SASL-IR", b"STARTTLS", b"LOGINDISABLED", b"COMPRESS=", b"LITERAL-"
)
#: Distinct upstream capability lists whose client form is remembered (a few per provider).
CAPABILITY_CACHE_SIZE: Final = 32
#: Capabilities mailgate adds after login: it converts literals for LITERAL- upstreams itself.
POST_LOGIN_ADD: Final = (b"LITERAL+",)


def client_capabilities(upstream: Iterable[str]) -> list[str]:
    """The upstream's post-login capabilities as mailgate's clients see them."""
    return list(_client_capabilities(tuple(upstream)))


@functools.lru_cache(maxsize=CAPABILITY_CACHE_SIZE)
def _client_capabilities(upstream: tuple[str, ...]) -> tuple[str, ...]:
    # Every login of a provider's accounts sees the same ~50 atoms: computed once, not per login.
    drop = [d.decode() for d in POST_LOGIN_DROP]
    out: list[str] = []
    for cap in upstream:
        up = cap.upper()
        if not any(up.startswith(d) if d.endswith("=") else up == d for d in drop):
            out.append(cap)
    present = {c.upper() for c in out}
    out += [a.decode() for a in POST_LOGIN_ADD if a.decode() not in present]
    return tuple(out)


def rewrite_capability_line(line: bytes) -> bytes:
    """One response line with its capability list (if any) made fit for a logged-in client."""
    return rewrite_capabilities(line, drop=POST_LOGIN_DROP, add=POST_LOGIN_ADD)


class ResponseScanner(imap_responses.ResponseScanner):
    """The reader's relay mode with the post-login capability policy (see the module docstring)."""

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE):
        super().__init__(max_line=max_line, rewrite_capability_line=rewrite_capability_line)
