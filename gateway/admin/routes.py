"""Request routing of the admin plane: one method per page, a small table from path to method.

Theory of operation
-------------------
:class:`AdminApp` turns a :class:`~gateway.admin.wire.Request` into a
:class:`~gateway.admin.wire.Response`. Access is checked first (:mod:`gateway.admin.access`),
then the route is looked up: exact paths in :attr:`AdminApp.routes`, plus the ``/authorize/USER``
prefix. WebSocket upgrades (``/events``) never get here: the HTTP driver hands them to
:mod:`gateway.admin.events_ws` after the same access check.

Routes:

==========================  =========================================================
``GET /``                   status page (HTML, live-updating)
``GET /status/fragment``    the status page's body, for the live updates
``GET /api/status``         the same snapshot as JSON
``GET /metrics``            Prometheus text format
``GET /healthz``            200 ``ok`` when listening, 503 ``draining`` while shutting down
``GET /authorize/USER``     start the browser authorization of USER
``GET /oauth/callback``     the provider's redirect; shows the password form
``POST /oauth/complete``    the password form; seals and stores the authorization
``GET|POST /login``         token mode only: exchange the admin token for a session cookie
``GET /static/…``           the page's script and style sheet
==========================  =========================================================
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..defence import constant_time_equal
from . import pages
from .access import AdminAccess
from .authorize import CALLBACK_PATH, WebAuthorizations, WebFlowError
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .status import AccountActivity, snapshot
from .wire import Request, Response, html, json_response, method_not_allowed, not_found, redirect, text
from .worker_reports import (add_worker_sessions, combined_live, combined_metrics,
                             read_reports)

if TYPE_CHECKING:
    from ..config import ListenerConfig
    from ..server import GatewayServer

log = logging.getLogger("mailgate.admin")

Route = Callable[[Request], Awaitable[Response]]
CSRF_COOKIE = "mailgate_csrf"
STATIC = {
    "/static/status.js": (pages.STATUS_JS, "text/javascript; charset=utf-8"),
    "/static/status.css": (pages.STATUS_CSS, "text/css; charset=utf-8"),
}


class AdminApp:
    def __init__(self, server: "GatewayServer"):
        self.server = server
        self.access = AdminAccess(server.config.admin)
        self.metrics = Metrics()
        self.activity = AccountActivity()
        self.authorizations = WebAuthorizations()
        self.listeners: list[ListenerConfig] = list(server.config.listeners)
        server.events.observe(self.metrics)
        server.events.observe(self.activity)
        self.routes: dict[str, tuple[str, Route]] = {
            "/": ("GET", self.status_page),
            "/status/fragment": ("GET", self.status_fragment),
            "/api/status": ("GET", self.status_json),
            "/metrics": ("GET", self.metrics_text),
            "/healthz": ("GET", self.healthz),
            CALLBACK_PATH: ("GET", self.oauth_callback),
            "/oauth/complete": ("POST", self.oauth_complete),
            "/login": ("GET, POST", self.login),
        }

    async def handle(self, request: Request) -> Response:
        refusal = self.access.check(request)
        if refusal is not None:
            return refusal
        path = request.path
        if path in STATIC:
            body, ctype = STATIC[path]
            return text(body, 200, ctype)
        if path.startswith("/authorize/"):
            if request.method != "GET":
                return method_not_allowed("GET")
            return await self.authorize(request, urllib.parse.unquote(path[len("/authorize/"):]))
        entry = self.routes.get(path)
        if entry is None:
            return not_found()
        allowed, route = entry
        if request.method not in allowed.split(", "):
            return method_not_allowed(allowed)
        return await route(request)

    # --- status ---------------------------------------------------------------------------

    async def _snapshot(self) -> dict:  # type: ignore[type-arg]
        snap = await snapshot(self.server, self.listeners, self.activity)
        return add_worker_sessions(snap, self.server, read_reports(self.server))

    async def status_page(self, request: Request) -> Response:
        return html(pages.status_page(await self._snapshot()))

    async def status_fragment(self, request: Request) -> Response:
        return html(pages.status_fragment(await self._snapshot()))

    async def status_json(self, request: Request) -> Response:
        return json_response(await self._snapshot())

    async def metrics_text(self, request: Request) -> Response:
        reports = read_reports(self.server)
        metrics = combined_metrics(self.metrics, reports)
        return text(metrics.render(combined_live(self.server, reports)), 200, METRICS_CONTENT_TYPE)

    async def healthz(self, request: Request) -> Response:
        if self.server.draining or self.server.finished.is_set():
            return text("draining\n", 503)
        if not self.server.addresses:
            return text("starting\n", 503)
        return text("ok\n")

    # --- login (token mode) ---------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        if not self.access.token_required:
            return redirect("/")
        if request.method == "GET":
            return html(pages.login_page(_safe_next(request.query.get("next", "/"))))
        form = request.form()
        next_target = _safe_next(form.get("next", "/"))
        if not self.access.token_matches(form.get("token", "")):
            log.warning("admin login with a wrong token from %s", request.peer_host)
            return html(pages.login_page(next_target, "wrong token"), 403)
        return redirect(next_target, [("Set-Cookie", self.access.session_cookie())])

    # --- authorization --------------------------------------------------------------------

    async def authorize(self, request: Request, user: str) -> Response:
        # The redirect must come back to the address the browser uses (a TLS reverse proxy says
        # so in X-Forwarded-Proto). The identity provider only redirects to registered URIs,
        # so a forged header cannot send the code anywhere else.
        scheme = "https" if request.header("x-forwarded-proto") == "https" else "http"
        base_url = f"{scheme}://{request.header('host') or self.server.config.admin.bind}"
        try:
            url = self.authorizations.start(self.server.config, user, base_url=base_url)
        except WebFlowError as exc:
            return html(pages.message_page("Cannot authorize", str(exc), ok=False), exc.status)
        return redirect(url)

    async def oauth_callback(self, request: Request) -> Response:
        try:
            entry = await self.authorizations.callback(
                self.server.config, self.server.ctx.store, request.query
            )
        except WebFlowError as exc:
            return html(pages.message_page("Authorization failed", str(exc), ok=False), exc.status)
        cookie = f"{CSRF_COOKIE}={entry.csrf}; Path=/oauth; HttpOnly; SameSite=Strict"
        form = pages.password_form(entry.user, flow_id=entry.flow_id, csrf=entry.csrf,
                                   existing=entry.existing is not None)
        return html(form, 200, [("Set-Cookie", cookie)])

    async def oauth_complete(self, request: Request) -> Response:
        form = request.form()
        entry = self.authorizations.by_flow_id(form.get("flow", ""))
        csrf = form.get("csrf", "")
        if (
            entry is None
            or entry.answer is None
            or not _same(csrf, entry.csrf)
            or not _same(request.cookies.get(CSRF_COOKIE, ""), entry.csrf)
        ):
            return html(pages.message_page(
                "Authorization failed",
                "this form is unknown, expired or was not sent from this browser; start again",
                ok=False), 403)
        ctx = self.server.ctx
        try:
            await self.authorizations.complete(
                ctx.config, ctx.store, ctx.accounts.kdf, entry, password=form.get("password", ""),
                confirm=form.get("confirm", ""),
            )
        except WebFlowError as exc:
            if self.authorizations.by_flow_id(entry.flow_id) is None:
                return html(pages.message_page("Authorization failed", str(exc), ok=False),
                            exc.status)
            return html(pages.password_form(entry.user, flow_id=entry.flow_id, csrf=entry.csrf,
                                            existing=entry.existing is not None, error=str(exc)),
                        400)
        self.server.events.publish({"type": "account.authorized", "user": entry.user,
                                    "provider": entry.provider})
        return html(pages.message_page(
            f"{entry.user} is authorized",
            f"{entry.user} can now log in through this gateway with the local password.",
            ok=True))


def _same(a: str, b: str) -> bool:
    return bool(a) and constant_time_equal(a, b)


def _safe_next(target: str) -> str:
    """Only local paths: ``next`` must never send the browser to another site."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
