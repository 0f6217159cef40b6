"""The upstream side: an OAuth-authenticated IMAP client shared by the IMAP and POP3 front ends.

``connector.UpstreamConnector.open(account)`` gives an authenticated ``client.UpstreamIMAP``
(through ``login.open_upstream``), within the account's connection cap (``slots``).
"""
