"""The admin plane: one loopback HTTP port with the status page, ``/events`` (WebSocket),
``/metrics`` (Prometheus), ``/healthz`` and browser authorization of accounts.

Modules: :mod:`~gateway.admin.http` (the h11 I/O driver, ``serve_admin``),
:mod:`~gateway.admin.wire` (requests and responses, sans-IO), :mod:`~gateway.admin.access`
(who may use the port), :mod:`~gateway.admin.routes` (which page answers),
:mod:`~gateway.admin.status` (the snapshot), :mod:`~gateway.admin.pages` (HTML),
:mod:`~gateway.admin.metrics` (Prometheus), :mod:`~gateway.admin.events_ws` (the event stream),
:mod:`~gateway.admin.authorize` (the browser authorization flow).
"""
