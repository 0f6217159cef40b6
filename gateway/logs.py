"""Logging set-up: human-readable or JSON lines, with secrets redacted on the way out.

Theory of operation
-------------------
Code is written never to log a secret. This module is the second line of defence: a
:class:`RedactingFilter` on every handler rewrites the final message (after %-formatting, and the
formatted exception text too) so that

* every secret registered with :func:`register_secret` becomes ``[redacted]``: the configured
  client secrets and admin token (:mod:`gateway.app`), each access and refresh token the token
  manager obtains or unseals and each local password once verified
  (:mod:`gateway.oauth.accounts`), and the password and tokens of an authorization
  (:mod:`gateway.oauth.lifecycle`). Wrong passwords are not registered: a guesser could
  otherwise pick words to censor from the log;
* anything shaped like a credential is masked: ``Bearer <x>``, ``access_token``/``refresh_token``/
  ``password``/``client_secret``/``code``/``assertion`` fields in form, JSON or ``key=value``
  form, and ``AUTHENTICATE``/``AUTH`` lines with their SASL blobs.

Registered secrets are held as a bounded set of their own values in memory only — the process
already holds those secrets; keeping a reference does not widen exposure.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections import OrderedDict
from typing import Any, TextIO

MAX_REGISTERED_SECRETS = 10_000
MIN_SECRET_LENGTH = 4  # shorter strings would redact ordinary words
REDACTED = "[redacted]"

_registered: "OrderedDict[str, None]" = OrderedDict()

_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9\-._~+/]+=*"),
    re.compile(
        r"(?i)((?:access_token|refresh_token|id_token|password|passwd|client_secret|code_verifier"
        r"|device_code|assertion|code|token|secret)[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,}]+"
    ),
    # Protocol command lines (as clients send them: upper-case verbs), so that an ordinary
    # sentence such as "login failed for 'carol'" is left alone.
    re.compile(r"(\b(?:AUTH|AUTHENTICATE|[Aa]uthenticate)\s+\S+\s+)\S+"),
    re.compile(r"(\b(?:LOGIN|[Ll]ogin)\s+(?!failed\b|ok\b|succeeded\b)\S+\s+)\S+"),
    re.compile(r"(\bPASS\s+)\S+"),
]


def register_secret(value: str | bytes | None) -> None:
    """Make sure ``value`` never appears in a log line."""
    if not value:
        return
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if len(value) < MIN_SECRET_LENGTH:
        return
    _registered[value] = None
    _registered.move_to_end(value)
    while len(_registered) > MAX_REGISTERED_SECRETS:
        _registered.popitem(last=False)


def redact(text: str) -> str:
    """``text`` with every registered secret and every credential-shaped value masked. Both are
    found in the original text and masked together, so that neither can hide the other (a
    registered secret that is also part of a key name, say ``secret`` in ``client_secret=``)."""
    spans: list[tuple[int, int]] = []
    for secret in list(_registered):
        start = text.find(secret)
        while start != -1:
            spans.append((start, start + len(secret)))
            start = text.find(secret, start + 1)
    for pattern in _PATTERNS:
        spans.extend((m.end(1), m.end()) for m in pattern.finditer(text))
    if not spans:
        return text
    spans.sort()
    parts: list[str] = []
    done = 0  # text[:done] is written (or masked)
    for start, end in spans:
        if end <= done:
            continue
        if start > done:
            parts.append(text[done:start])
            parts.append(REDACTED)
        elif not parts or parts[-1] != REDACTED:
            parts.append(REDACTED)  # starts inside the previous span: one mask for both
        done = end
    parts.append(text[done:])
    return "".join(parts)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = redact(message)
        record.args = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party chatter that would otherwise print request URLs with codes in them.
    for noisy in ("httpx", "httpcore", "hpack", "trio-websocket"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
