"""Run a standalone lab (OAuth server + Dovecot) for demos and benchmarks.

Usage::

    python -m tests.lab --dir /tmp/mailgate-lab

starts :class:`~tests.lab.LabOAuthServer` and :class:`~tests.lab.LabDovecot` (its files in a
fresh temporary directory the unprivileged mail user can reach; removed at exit), seeds the demo user ``demo@example.com`` with a few corpus messages, writes
``DIR/lab.json`` and serves until SIGINT or SIGTERM, then stops everything and removes
``lab.json``. ``lab.json`` holds everything a mailgate config needs::

    {"imap_host": "127.0.0.1", "ports": {"imap": .., "imaps": .., "pop3": .., "pop3s": ..},
     "ca_file": "...", "password": "labpass",
     "oauth": {"url", "authorize_url", "token_url", "device_url", "introspect_url",
               "client_id", "client_secret"},
     "demo_user": "demo@example.com", "demo_refresh_token": "...", "demo_access_token": "...",
     "pid": ...}

It contains secrets of this throw-away lab only, and is written with mode 0600.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tests.lab import seed
from tests.lab.corpus import CORPUS
from tests.lab.dovecot import LabDovecot
from tests.lab.oauth_server import LabOAuthServer

DEMO_USER = "demo@example.com"
#: Corpus messages seeded into the demo user's INBOX, in this order.
DEMO_MESSAGES = ("simple", "dot_lines", "nested_multipart", "utf8_headers", "long_line")
#: Access tokens of the standalone lab live long: a demo may sit idle for a while.
DEMO_ACCESS_TOKEN_LIFETIME = 3600


def lab_description(oauth: LabOAuthServer, dovecot: LabDovecot,
                    refresh_token: str, access_token: str) -> dict[str, Any]:
    """The content of ``lab.json``."""
    return {
        "imap_host": dovecot.host,
        "ports": dict(dovecot.ports),
        "ca_file": str(dovecot.ca_file),
        "password": dovecot.password,
        "dovecot_dir": str(dovecot.dir),
        "dovecot_log": str(dovecot.log_path),
        "sink_dir": str(dovecot.sink.dir) if dovecot.sink else None,
        "oauth": {
            "url": oauth.url,
            "authorize_url": oauth.authorize_url,
            "token_url": oauth.token_url,
            "device_url": oauth.device_url,
            "introspect_url": oauth.introspect_url,
            "client_id": oauth.client_id,
            "client_secret": oauth.client_secret,
        },
        "demo_user": DEMO_USER,
        "demo_refresh_token": refresh_token,
        "demo_access_token": access_token,
        "pid": os.getpid(),
    }


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)  # readers never see a half-written file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, type=Path, help="directory for lab.json and Dovecot")
    args = parser.parse_args(argv)
    directory: Path = args.dir.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    lab_json = directory / "lab.json"

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    oauth = LabOAuthServer(access_token_lifetime=DEMO_ACCESS_TOKEN_LIFETIME,
                           default_user=DEMO_USER)
    oauth.client_credentials_user = DEMO_USER
    with oauth, LabDovecot(oauth) as dovecot:
        for name in DEMO_MESSAGES:
            seed.append(dovecot, DEMO_USER, CORPUS[name])
        access, refresh = oauth.issue_tokens(DEMO_USER)
        _write_private(lab_json, json.dumps(
            lab_description(oauth, dovecot, refresh, access), indent=2) + "\n")
        print(f"lab ready: {lab_json} (imaps {dovecot.ports['imaps']}, "
              f"pop3s {dovecot.ports['pop3s']}, oauth {oauth.url})", flush=True)
        while not stop.wait(0.5):
            pass
        lab_json.unlink(missing_ok=True)
    print("lab stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
