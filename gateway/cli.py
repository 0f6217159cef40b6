"""The ``mailgate`` command line.

Every command loads the config the same way and turns every expected failure into one or more
lines on stderr and an exit code a shell script can act on:

====  ===========================================================
code  meaning
====  ===========================================================
0     success
1     the command ran and failed (login refused, flow denied, ...)
2     the config is invalid, or the command line is wrong
3     a temporary problem (identity provider or upstream unreachable)
====  ===========================================================

A traceback is only ever printed with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from . import __version__
from .app import serve
from .certs import ensure_certificate
from .config import DEFAULT_CONFIG_NAME, Config, load_config
from .errors import ConfigError, MailgateError, TemporaryFailure
from .logs import setup_logging
from .notify.report import accounts_report
from .oauth.commands import account_status, authorize, passwd
from .oauth.migrate import migrate_store
from .oauth.store import StoreError
from .workers import run_workers

log = logging.getLogger("mailgate")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_TEMPORARY = 0, 1, 2, 3


def default_config_path() -> Path:
    env = os.environ.get("MAILGATE_CONFIG")
    if env:
        return Path(env)
    return Path(DEFAULT_CONFIG_NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailgate",
        description="Let legacy IMAP and POP3 clients reach OAuth 2.0-only mail providers.",
    )
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"config file (default: $MAILGATE_CONFIG or ./{DEFAULT_CONFIG_NAME})",
    )
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    parser.add_argument(
        "--log-format", choices=["text", "json"], default=None, help="override logging.format"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("serve", help="run the listeners and the admin plane until SIGTERM")
    sub.add_parser("check", help="validate the config and the accounts; say what to fix")
    sub.add_parser("certs", help="create the TLS certificate if missing; print what clients trust")
    p = sub.add_parser("accounts", help="every account: token state and expiry, last error, what to do")
    _flags(p, json="one JSON object, for scripts")
    sub.add_parser("migrate-store",
                   help="copy the SQLite state file into the [store] url PostgreSQL database")

    p = sub.add_parser("passwd", help="set or change a user's local password")
    p.add_argument("user")
    _flags(
        p,
        password_stdin="read the passwords from stdin: the current one (if set), then the new one",
        reset="set a new password without the current one (discards the stored authorization)",
    )

    p = sub.add_parser("authorize", help="authorize a user's upstream account (OAuth 2.0)")
    p.add_argument("user")
    _flags(
        p,
        manual="headless: open the URL elsewhere and paste the redirected URL back",
        refresh_token_stdin="import a refresh token obtained elsewhere (read from stdin)",
        password_stdin="read the local password as the first line of stdin",
    )
    return parser


def _flags(parser: argparse.ArgumentParser, **flags: str) -> None:
    """Add each ``name=help`` as the on/off option ``--name`` (underscores become dashes)."""
    for name, text in flags.items():
        parser.add_argument("--" + name.replace("_", "-"), action="store_true", help=text)


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config or default_config_path())


def _print_problems(exc: ConfigError, path: Path | None) -> None:
    where = f" in {path}" if path else ""
    print(f"mailgate: the configuration{where} has problems:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    print(f"config OK: {config.path}")
    print(
        f"  {len(config.listeners)} listener(s), {len(config.providers)} provider(s), "
        f"{len(config.users)} user(s)"
    )
    return account_status(config, sys.stdout)


def cmd_certs(args: argparse.Namespace) -> int:
    config = _load(args)
    info = ensure_certificate(config.tls.cert_file, config.tls.key_file, config.server.hostname)
    print(("created " if info.created else "") + f"certificate: {info.cert_file}")
    print(f"private key: {info.key_file}")
    if info.ca_file:
        print(f"CA certificate to install on clients: {info.ca_file}")
    print(f"SHA-256 fingerprint to pin: {info.sha256_fingerprint}")
    return EXIT_OK


def cmd_accounts(args: argparse.Namespace) -> int:
    return accounts_report(_load(args), sys.stdout, as_json=args.json)


def cmd_passwd(args: argparse.Namespace) -> int:
    return passwd(_load(args), args.user, password_stdin=args.password_stdin, reset=args.reset)


def cmd_authorize(args: argparse.Namespace) -> int:
    return authorize(
        _load(args),
        args.user,
        manual=args.manual,
        refresh_token_stdin=args.refresh_token_stdin,
        password_stdin=args.password_stdin,
    )


def cmd_migrate_store(args: argparse.Namespace) -> int:
    return migrate_store(_load(args), sys.stdout)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args)
    _setup_logging(args, config)
    if config.server.worker_count > 1:
        return run_workers(config, args.config or default_config_path())
    return trio.run(serve, config, args.config or default_config_path())


def _setup_logging(args: argparse.Namespace, config: Config | None) -> None:
    level = "debug" if args.debug else (config.logging.level if config else "info")
    fmt = args.log_format or (config.logging.format if config else "text")
    setup_logging(level, fmt)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "check": cmd_check,
    "certs": cmd_certs,
    "accounts": cmd_accounts,
    "passwd": cmd_passwd,
    "authorize": cmd_authorize,
    "migrate-store": cmd_migrate_store,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        _setup_logging(args, None)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        _print_problems(exc, args.config or default_config_path())
        return EXIT_CONFIG
    except (TemporaryFailure, StoreError) as exc:  # StoreError: e.g. PostgreSQL unreachable
        print(f"mailgate: temporary failure: {exc}", file=sys.stderr)
        return EXIT_TEMPORARY
    except MailgateError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("mailgate: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except OSError as exc:
        if args.debug:
            raise
        print(f"mailgate: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
