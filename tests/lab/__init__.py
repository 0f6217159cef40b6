"""The mailgate test lab: a real Dovecot 2.3 and a real local OAuth 2.0 server on loopback.

* :class:`LabOAuthServer` (``oauth_server.py``) -- authorization code + PKCE, refresh (with
  optional rotation), client credentials, JWT bearer, device grant, RFC 7662 introspection;
  failure injection; records every request and every secret it issued.
* :class:`LabDovecot` (``dovecot.py``) -- a private Dovecot instance on free ports (imap,
  imaps, pop3, pop3s) that accepts XOAUTH2/OAUTHBEARER tokens of the OAuth server and a shared
  lab password for PLAIN/LOGIN; any user name is a fresh mailbox (:meth:`LabDovecot.new_user`).
* ``seed.py`` -- byte-exact APPEND and direct IMAP/POP3 reads (the reference answers).
* ``corpus.py`` -- awkward messages and a deterministic big message.

pytest fixtures (``tests/conftest.py``): ``oauth_server``, ``lab`` (session, one per xdist
worker) and ``lab_user`` (a fresh user per test). ``python -m tests.lab --dir DIR`` runs a
standalone lab for demos and benchmarks (see ``__main__.py``).
"""

from tests.lab.dovecot import INSTALL_HINT, DovecotNotInstalled, LabDovecot
from tests.lab.oauth_server import LabOAuthServer, pkce_challenge

__all__ = ["LabDovecot", "LabOAuthServer", "DovecotNotInstalled", "INSTALL_HINT",
           "pkce_challenge"]
