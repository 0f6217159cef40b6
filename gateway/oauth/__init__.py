"""OAuth 2.0 for mailgate: provider presets, authorization flows, the token manager, the sealed
secret store and local passwords.

The rest of the gateway only needs :class:`gateway.oauth.accounts.AccountManager` (local login)
and :class:`gateway.oauth.accounts.Account` (``await account.access_token()``); the CLI calls the
command functions in :mod:`gateway.oauth.commands`.
"""
