"""The upstream side: an OAuth-authenticated IMAP client shared by the IMAP and POP3 front ends.

``login.open_upstream(account, limits)`` gives an authenticated ``client.UpstreamIMAP``.
"""
