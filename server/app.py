"""Build the aiohttp application and run the server with its scheduler."""

from __future__ import annotations

import logging

from aiohttp import web

from server.api import accounts, agent, audit, events, jobs, meta, models, nodes, outputs  # noqa: F401  (modules register their routes)
from server.api import metrics as _metrics_routes  # noqa: F401  (GET /metrics)
from server.api.access import auth_middleware
from server.api.middleware import CTX, errors_middleware, origin_middleware
from server.api.registry import add_routes
from server.auth.service import BOOTSTRAP_ADMIN, bootstrap_admin
from server.context import FarmContext
from server.metrics import metrics_for
from server.scheduler import Scheduler
from server.scheduler.dispatcher import forget_dispatches
from server.scheduler.reconciler import reconcile_cache
from server.web import routes as _web_routes  # noqa: F401  (GET /, the web UI)

log = logging.getLogger(__name__)


def announce_admin(ctx: FarmContext, password: str) -> None:
    """Print the first admin's generated password, once, on the server's standard output."""
    path = ctx.settings.data_dir / "secrets" / "initial-admin-password"
    print(
        f"renderfarm: created the first admin, user {BOOTSTRAP_ADMIN!r}, password {password}\n"
        f"renderfarm: (also in {path}, readable by you only; change it with `renderfarm user set-password`)",
        flush=True,
    )


SCHEDULER = web.AppKey("scheduler", Scheduler)


async def _nosniff(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer (JSON, frames, zips) says its type is to be believed, not guessed by a browser."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")


def create_app(ctx: FarmContext, *, run_scheduler: bool = True) -> web.Application:
    """The API application; on start it creates the tables and (by default) starts the scheduler.

    Args:
        ctx: the farm's backends and settings (closed on shutdown).
        run_scheduler: start the outbox relay and the timeout checker with the app.
    """
    app = web.Application(
        middlewares=[errors_middleware, origin_middleware, auth_middleware],
        client_max_size=ctx.settings.limits.max_upload_bytes,
    )
    app[CTX] = ctx
    metrics_for(ctx)  # recorded from the first request on, not from the first scrape
    add_routes(app)
    app.on_response_prepare.append(_nosniff)

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        await ctx.db.create_all()
        password = await bootstrap_admin(ctx)
        if password is not None:
            announce_admin(ctx, password)
        if getattr(ctx.broker, "durable", True) is False:
            n = await forget_dispatches(ctx)
            if n:
                log.warning("dispatching again %d queued task(s) left from the previous run", n)
        hooks = getattr(ctx.cache, "on_recover", None)
        if isinstance(hooks, list):  # after a cache outage, rewrite what it missed

            async def _rewrite() -> None:
                await reconcile_cache(ctx, full=True)

            hooks.append(_rewrite)
        scheduler = Scheduler(ctx)
        if run_scheduler:
            scheduler.start()
        app[SCHEDULER] = scheduler
        yield
        await scheduler.stop()
        await ctx.close()

    app.cleanup_ctx.append(lifecycle)
    return app
