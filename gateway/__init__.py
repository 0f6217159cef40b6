"""mailgate: a gateway that lets legacy IMAP and POP3 clients use OAuth 2.0-only mail providers."""

__version__ = "0.1.0"
