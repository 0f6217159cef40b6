"""Assemble and run a gateway: certificates, accounts, listeners, admin plane, signals.

Theory of operation
-------------------
:func:`build_context` is the one place the concrete parts behind :mod:`gateway.ports` are made:
the credential store (:func:`~gateway.oauth.store.open_store`), the
:class:`~gateway.oauth.accounts.AccountManager`, the
:class:`~gateway.upstream.connector.UpstreamConnector` and the event bus; it also registers the
configured secrets (client secrets, the admin token, proxy passwords) with
:func:`gateway.logs.register_secret`, and the :class:`~gateway.notify.notifier.Notifier`
observing the bus (run as one task of :func:`serve`'s nursery).
:func:`build` adds the TLS certificate and the server, and :func:`serve` runs them in one
nursery until SIGTERM/SIGINT:

* SIGTERM / SIGINT: stop accepting, let sessions finish for ``limits.shutdown_grace`` seconds,
  then cancel them (a cancelled POP3 session never enters UPDATE: nothing is deleted).
* SIGHUP: re-read the config file. A config with problems is refused, its problems logged, and
  the running one kept. A good one is swapped in whole for *new* sessions (new users, changed
  providers and limits); running sessions keep the objects they started with. The TLS
  certificate is re-loaded into a fresh SSL context for new connections.

The admin plane is imported like every other module: if it cannot be imported the gateway does
not start (a broken install never silently turns the admin port off).
"""

from __future__ import annotations

import logging
import signal
from urllib.parse import urlsplit
from pathlib import Path

import trio

from .admin.http import serve_admin
from .admin.worker_reports import run_reporter
from .certs import ensure_certificate
from .config import Config, load_config, per_worker
from .context import GatewayContext
from .errors import ConfigError
from .events import EventBus
from .frontends.pop3_listing import Pop3StateFiles
from .frontends.pop3_mapping import STATE_SUBDIR
from .logs import register_secret
from .notify.notifier import Notifier
from .oauth.accounts import AccountManager
from .oauth.store import open_store
from .ports import CredentialStore, Pop3StateStore
from .server import GatewayServer, make_server_ssl_context
from .upstream.connector import UpstreamConnector
from .upstream.smtp_connector import SmtpConnector

log = logging.getLogger("mailgate")


def build_context(config: Config) -> GatewayContext:
    """The running parts of a gateway for ``config`` (raises StoreError if the store cannot be
    opened)."""
    _register_secrets(config)
    events = EventBus()
    store = open_store(config)
    notifier = Notifier(config)
    events.observe(notifier.observe)
    return GatewayContext(
        config=config,
        accounts=AccountManager(config, store=store, events=events),
        events=events,
        connector=UpstreamConnector(config, publish=events.publish),
        store=store,
        notifier=notifier,
        smtp=SmtpConnector(config, publish=events.publish),
        pop3_state=_pop3_state(config, store),
    )


def _pop3_state(config: Config, store: CredentialStore) -> Pop3StateStore:
    """Where POP3 sessions remember listings and sizes: the PostgreSQL store when it is the
    credential store (every instance then sees the same), else files under ``state_dir``."""
    if config.store.url is not None:
        from .oauth.pg_store import PgStore  # imported only with [store] url, as open_store does

        assert isinstance(store, PgStore)
        return store
    return Pop3StateFiles(config.server.state_dir / STATE_SUBDIR)


def _register_secrets(config: Config) -> None:
    for provider in config.providers.values():
        if provider.client_secret is not None:
            register_secret(provider.client_secret.get_secret_value())
    if config.admin.token is not None:
        register_secret(config.admin.token.get_secret_value())
    if config.notify.webhook_token is not None:
        register_secret(config.notify.webhook_token.get_secret_value())
    for provider in config.providers.values():  # proxy passwords
        for url in (provider.https_proxy, provider.upstream_proxy):
            password = urlsplit(url).password if url else None
            if password:
                register_secret(password)
    if config.store.url is not None:  # the PostgreSQL URL and its password
        url = config.store.url.get_secret_value()
        register_secret(url)
        register_secret(urlsplit(url).password or "")


def build(config: Config) -> tuple[GatewayContext, GatewayServer]:
    if any(lst.tls != "none" for lst in config.listeners):
        info = ensure_certificate(config.tls.cert_file, config.tls.key_file, config.server.hostname)
        if info.created:
            log.info(
                "created a TLS certificate %s (CA for clients: %s, SHA-256 %s)",
                info.cert_file,
                info.ca_file,
                info.sha256_fingerprint,
            )
    ctx = build_context(config)
    return ctx, GatewayServer(ctx)


def reload(server: GatewayServer, config_path: Path) -> bool:
    """Swap in a new config for new sessions; keep the old one if the new one is invalid."""
    try:
        config = per_worker(load_config(config_path))
    except ConfigError as exc:
        log.error("SIGHUP: the new configuration was refused, the running one is kept:")
        for problem in exc.problems:
            log.error("  - %s", problem)
        return False
    _register_secrets(config)
    ctx = server.ctx
    ctx.config = config
    ctx.accounts.update_config(config)
    ctx.connector.update_config(config)
    if ctx.notifier is not None:
        ctx.notifier.update_config(config)
    if ctx.smtp is not None:
        ctx.smtp.update_config(config)
    if any(lst.tls != "none" for lst in config.listeners) and server.ssl_context is not None:
        try:
            server.ssl_context = make_server_ssl_context(config)
        except (OSError, ValueError) as exc:
            log.error("SIGHUP: certificate not reloaded (%s); the old one stays in use", exc)
    log.info("SIGHUP: configuration reloaded (%d users)", len(config.users))
    ctx.events.publish({"type": "config.reloaded", "users": len(config.users)})
    return True


async def serve(config: Config, config_path: Path, *, worker: int = 0) -> int:
    """Run until SIGTERM/SIGINT. ``worker``: this process's number among ``server.workers``
    (:mod:`gateway.workers`); only worker 0 serves the admin port."""
    config = per_worker(config)
    ctx, server = build(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        if ctx.notifier is not None:
            await nursery.start(ctx.notifier.run)
        if config.admin.enabled and worker == 0:
            await nursery.start(serve_admin, server)
        elif config.admin.enabled and config.server.worker_count > 1:
            nursery.start_soon(run_reporter, server, worker)  # figures for worker 0's admin port
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
    ctx.store.close()
    return 0

