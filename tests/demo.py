"""The README's demo: a lab upstream (Dovecot + local OAuth server) with mailgate in front of it.

Usage (what ``bash .ci/demo`` runs)::

    python -m tests.demo [--dir demo] [--imaps 1993] [--pop3s 1995] [--admin 8025]

1. starts the standalone lab (``python -m tests.lab``) as a child process and waits for its
   ``lab.json``;
2. writes ``DIR/mailgate.toml`` — listeners on loopback, the lab as provider, one user ``demo``;
3. seeds the ``demo`` account the way an admin migrating from another tool would:
   ``mailgate authorize demo --refresh-token-stdin --password-stdin``;
4. prints how to read the demo mailbox with curl over POP3S and IMAPS, then runs
   ``mailgate serve`` in the foreground until Ctrl-C, and stops the lab.

Everything stays on 127.0.0.1, and everything it writes is under DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DEMO_PASSWORD = "demo-password"
LAB_START_TIMEOUT = 30.0


def write_config(directory: Path, lab: dict, ports: argparse.Namespace) -> Path:
    oauth = lab["oauth"]
    text = f"""# Written by the demo (python -m tests.demo): mailgate in front of the local lab.
[server]
state_dir = "state"
hostname = "localhost"

[[listener]]
protocol = "imap"
bind = "127.0.0.1:{ports.imaps}"
tls = "implicit"

[[listener]]
protocol = "pop3"
bind = "127.0.0.1:{ports.pop3s}"
tls = "implicit"

[admin]
bind = "127.0.0.1:{ports.admin}"

[providers.lab]
imap = "{lab['imap_host']}:{lab['ports']['imaps']}"
imap_tls = "implicit"
ca_file = "{lab['ca_file']}"
sasl = "xoauth2"
flow = "authorization_code"
authorize_url = "{oauth['authorize_url']}"
token_url = "{oauth['token_url']}"
scopes = ["mail"]
client_id = "{oauth['client_id']}"
client_secret = "{oauth['client_secret']}"

[users.demo]
provider = "lab"
upstream_user = "{lab['demo_user']}"

[limits]
auth_failure_delay = 0.5
"""
    path = directory / "mailgate.toml"
    path.write_text(text)
    return path


def wait_for_lab(lab_json: Path, proc: subprocess.Popen[bytes]) -> dict:
    deadline = time.monotonic() + LAB_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("demo: the lab did not start (see the messages above)")
        if lab_json.exists():
            return json.loads(lab_json.read_text())
        time.sleep(0.1)
    raise SystemExit(f"demo: the lab did not start within {LAB_START_TIMEOUT:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("demo"))
    parser.add_argument("--imaps", type=int, default=1993)
    parser.add_argument("--pop3s", type=int, default=1995)
    parser.add_argument("--admin", type=int, default=8025)
    args = parser.parse_args(argv)
    directory = args.dir.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    lab_json = directory / "lab" / "lab.json"
    lab_json.unlink(missing_ok=True)
    python = sys.executable
    lab = subprocess.Popen([python, "-m", "tests.lab", "--dir", str(lab_json.parent)])
    try:
        info = wait_for_lab(lab_json, lab)
        config = write_config(directory, info, args)
        mailgate = [python, "-m", "gateway", "--config", str(config)]
        seeded = subprocess.run(
            [*mailgate, "authorize", "demo", "--refresh-token-stdin", "--password-stdin"],
            input=f"{DEMO_PASSWORD}\n{info['demo_refresh_token']}\n",
            text=True,
            capture_output=True,
        )
        if seeded.returncode != 0:
            sys.stderr.write(seeded.stdout + seeded.stderr)
            return seeded.returncode
        subprocess.run([*mailgate, "certs"], check=True, capture_output=True)
        ca = directory / "certs" / "mailgate-ca.pem"
        print(
            f"""
mailgate demo is starting: IMAPS 127.0.0.1:{args.imaps}, POP3S 127.0.0.1:{args.pop3s},
status page http://127.0.0.1:{args.admin}/   (config: {config})

Read the demo mailbox through mailgate with the local password '{DEMO_PASSWORD}':

  curl --cacert {ca} -u demo:{DEMO_PASSWORD} pop3s://localhost:{args.pop3s}/
  curl --cacert {ca} -u demo:{DEMO_PASSWORD} pop3s://localhost:{args.pop3s}/1
  curl --cacert {ca} -u demo:{DEMO_PASSWORD} 'imaps://localhost:{args.imaps}/INBOX?ALL'
  curl --cacert {ca} -u demo:{DEMO_PASSWORD} 'imaps://localhost:{args.imaps}/INBOX;UID=1'

Ctrl-C stops mailgate and the lab.
""",
            flush=True,
        )
        serve = subprocess.Popen([*mailgate, "serve"])
        try:
            return serve.wait()
        except KeyboardInterrupt:
            serve.send_signal(signal.SIGTERM)
            return serve.wait(timeout=60)
    finally:
        if lab.poll() is None:
            lab.send_signal(signal.SIGTERM)
            try:
                lab.wait(timeout=30)
            except subprocess.TimeoutExpired:
                lab.kill()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
