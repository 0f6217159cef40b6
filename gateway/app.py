"""Assemble and run a gateway: certificates, accounts, listeners, admin plane, signals.

Theory of operation
-------------------
:func:`build` turns a validated :class:`~gateway.config.Config` into the running parts and
:func:`serve` runs them in one nursery until SIGTERM/SIGINT:

* SIGTERM / SIGINT: stop accepting, let sessions finish for ``limits.shutdown_grace`` seconds,
  then cancel them (a cancelled POP3 session never enters UPDATE: nothing is deleted).
* SIGHUP: re-read the config file. A config with problems is refused, its problems logged, and
  the running one kept. A good one is swapped in whole for *new* sessions (new users, changed
  providers and limits); running sessions keep the objects they started with. The TLS
  certificate is re-loaded into a fresh SSL context for new connections.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import trio

from .certs import ensure_certificate
from .config import Config, load_config
from .context import GatewayContext
from .errors import ConfigError
from .events import EventBus
from .server import GatewayServer, make_server_ssl_context

log = logging.getLogger("mailgate")


def build(config: Config) -> tuple[GatewayContext, GatewayServer]:
    from .oauth.accounts import AccountManager

    if any(lst.tls != "none" for lst in config.listeners):
        info = ensure_certificate(config.tls.cert_file, config.tls.key_file, config.server.hostname)
        if info.created:
            log.info(
                "created a TLS certificate %s (CA for clients: %s, SHA-256 %s)",
                info.cert_file,
                info.ca_file,
                info.sha256_fingerprint,
            )
    events = EventBus()
    accounts = AccountManager(config, events=events)
    ctx = GatewayContext(config=config, accounts=accounts, events=events)
    return ctx, GatewayServer(ctx)


def reload(server: GatewayServer, config_path: Path) -> bool:
    """Swap in a new config for new sessions; keep the old one if the new one is invalid."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        log.error("SIGHUP: the new configuration was refused, the running one is kept:")
        for problem in exc.problems:
            log.error("  - %s", problem)
        return False
    ctx = server.ctx
    ctx.config = config
    update = getattr(ctx.accounts, "update_config", None)
    if update is not None:
        update(config)
    if any(lst.tls != "none" for lst in config.listeners) and server.ssl_context is not None:
        try:
            server.ssl_context = make_server_ssl_context(config)
        except (OSError, ValueError) as exc:
            log.error("SIGHUP: certificate not reloaded (%s); the old one stays in use", exc)
    log.info("SIGHUP: configuration reloaded (%d users)", len(config.users))
    ctx.events.publish({"type": "config.reloaded", "users": len(config.users)})
    return True


async def serve(config: Config, config_path: Path) -> int:
    ctx, server = build(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        admin = _admin_runner(config)
        if admin is not None:
            await nursery.start(admin, server)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    reload(server, config_path)
                    continue
                log.info("%s: shutting down", signal.Signals(signum).name)
                server.shutdown()
                break
        # server.run ends once its sessions are done (or the grace ran out); then the admin plane.
        await server.finished.wait()
        nursery.cancel_scope.cancel()
    return 0


def _admin_runner(config: Config):  # type: ignore[no-untyped-def]
    if not config.admin.enabled:
        return None
    try:
        from .admin.http import serve_admin
    except ImportError:
        return None
    return serve_admin
