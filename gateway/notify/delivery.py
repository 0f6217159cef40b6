"""Delivering one notification: the ``[notify] command`` and the webhook.

Theory of operation
-------------------
:func:`deliver` is called by the notifier's single consumer task, one notification at a time,
so deliveries never pile up and never run inside a session.

* **Command** (``notify.command``, a list: program and arguments, no shell): started with the
  notification as one JSON object on stdin (and nothing else: no token, password or secret is
  ever part of a notification), stdout and stderr captured and logged on failure. It must end
  within ``limits.notify_command_timeout``; then it is killed. A non-zero exit is logged.
* **Webhook** (``notify.webhook_url``): the same JSON object, POSTed with
  ``Content-Type: application/json`` (and ``Authorization: Bearer`` with ``webhook_token``),
  through ``[network] https_proxy`` when set. 2xx is success; a connection error, a timeout
  (``limits.notify_webhook_timeout``), 429 or 5xx is retried after
  ``limits.notify_webhook_backoff`` seconds, doubling, up to ``limits.notify_webhook_attempts``
  POSTs; any other answer (a 4xx: the request itself is wrong) is not retried. Failures are
  logged with the URL's host only.

Both are attempted for every notification; one failing does not stop the other.
"""

from __future__ import annotations

import json
import logging
import subprocess

import httpx
import trio

from ..config import Config
from .health import Notification

__all__ = ["deliver", "run_command", "post_webhook"]

log = logging.getLogger("mailgate.notify")

MAX_OUTPUT_LOGGED = 300
USER_AGENT = "mailgate-notify"


async def deliver(notification: Notification, config: Config) -> None:
    body = json.dumps(notification.as_json(), sort_keys=True).encode()
    if config.notify.command:
        await run_command(config.notify.command, body, timeout=config.limits.notify_command_timeout)
    if config.notify.webhook_url:
        await post_webhook(config, body)


async def run_command(command: list[str], body: bytes, *, timeout: float) -> bool:
    """Run ``command`` with ``body`` on stdin; whether it ended with status 0 in time."""
    name = command[0]
    result: subprocess.CompletedProcess[bytes] | None = None
    try:
        with trio.move_on_after(timeout):
            result = await trio.run_process(
                command, stdin=body, capture_stdout=True, capture_stderr=True, check=False
            )
    except OSError as exc:
        log.error("notify: command %s cannot be started: %s", name, exc.strerror or exc)
        return False
    if result is None:
        log.error("notify: command %s killed after %g s (limits.notify_command_timeout)",
                  name, timeout)
        return False
    if result.returncode != 0:
        output = (result.stderr or result.stdout or b"").decode("utf-8", "replace").strip()
        log.error("notify: command %s exited with status %d: %s", name, result.returncode,
                  output[:MAX_OUTPUT_LOGGED])
        return False
    return True


async def post_webhook(config: Config, body: bytes) -> bool:
    """POST ``body`` to the webhook, retrying with back-off; whether it was accepted."""
    url = config.notify.webhook_url
    assert url is not None
    limits = config.limits
    host = httpx.URL(url).host
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    if config.notify.webhook_token is not None:
        headers["Authorization"] = "Bearer " + config.notify.webhook_token.get_secret_value()
    delay = limits.notify_webhook_backoff
    for attempt in range(1, limits.notify_webhook_attempts + 1):
        problem = await _post_once(url, body, headers, config)
        if problem is None:
            return True
        if problem.startswith("HTTP 4") and not problem.startswith("HTTP 429"):
            log.error("notify: webhook %s refused the notification (%s); not retried",
                      host, problem)
            return False
        if attempt < limits.notify_webhook_attempts:
            log.warning("notify: webhook %s failed (%s); retry %d in %g s", host, problem,
                        attempt, delay)
            await trio.sleep(delay)
            delay *= 2
    log.error("notify: webhook %s failed %d times (%s); notification given up",
              host, limits.notify_webhook_attempts, problem)
    return False


async def _post_once(url: str, body: bytes, headers: dict[str, str], config: Config) -> str | None:
    """``None`` on a 2xx answer, else what went wrong."""
    timeout = config.limits.notify_webhook_timeout
    try:
        with trio.fail_after(timeout):
            async with httpx.AsyncClient(
                timeout=timeout, proxy=config.network.https_proxy,
                trust_env=config.network.trust_env, follow_redirects=False,
            ) as client:
                response = await client.post(url, content=body, headers=headers)
    except trio.TooSlowError:
        return f"no answer within {timeout:g} s"
    except httpx.HTTPError as exc:
        return type(exc).__name__
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}"
