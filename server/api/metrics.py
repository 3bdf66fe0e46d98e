"""``GET /metrics``: Prometheus metrics in the text exposition format (see :mod:`server.metrics`)."""

from __future__ import annotations

from aiohttp import web

from server.api.middleware import CTX
from server.api.registry import route
from server.context import FarmContext
from server.metrics import CONTENT_TYPE, metrics_for


@route(
    "GET",
    "/metrics",
    permission="public",
    summary="Prometheus metrics (text exposition format)",
    response_content="text/plain",
)
async def metrics(request: web.Request) -> web.Response:
    """The farm's metrics; 200 even when a backend cannot be read (``renderfarm_backend_up`` says so).

    Public like ``/healthz``, so that Prometheus can scrape it without a credential: the
    figures are counts by state, pool and backend, with no job, user or file names and no
    secret. A studio should still keep ``/metrics`` on its internal network (scrape the
    server over the Compose network, and do not route ``/metrics`` through a proxy that
    faces the internet): queue sizes and agent counts are nobody else's business, and every
    scrape costs a few database queries.
    """
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    body = await metrics_for(ctx).render(ctx)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
