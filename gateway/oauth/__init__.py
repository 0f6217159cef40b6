"""OAuth 2.0 for mailgate: provider presets, authorization flows, the token manager, the sealed
secret store and local passwords.

The rest of the gateway sees this package through the protocols of :mod:`gateway.ports`:
:class:`gateway.oauth.accounts.AccountManager` is the ``Accounts`` (local login),
:class:`gateway.oauth.accounts.Account` the ``TokenSource`` (``await account.access_token()``),
:class:`gateway.oauth.store.StateStore` the ``CredentialStore``. The CLI calls the command
functions in :mod:`gateway.oauth.commands`; they and the admin plane's browser authorization
share :func:`gateway.oauth.lifecycle.authorize_account`.
"""
