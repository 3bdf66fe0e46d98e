"""``/healthz`` and ``/api/openapi.json``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from aiohttp import web
from sqlalchemy import text

from protocol.messages import TASK_QUEUE
from server.api.middleware import CTX
from server.api.registry import ROUTES, route
from server.api.schemas import ErrorBody
from server.auth.permissions import roles_with
from server.context import FarmContext


@route("GET", "/healthz", permission="public", summary="Liveness and the state of each backend")
async def healthz(request: web.Request) -> web.Response:
    """200 while the database answers (``status`` is ``degraded`` when the broker or the cache
    does not: jobs are still accepted and status reads fall back to the database); 503 otherwise.

    Storage is ``degraded`` from a failed write or read (an object store that does not
    answer) until the next one succeeds. The body names each backend's state but never
    its URL or an error's text (it is public).
    """
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    checks: dict[str, Any] = {}
    try:
        async with ctx.db.session() as s:
            await s.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        checks["queue_depth"] = await asyncio.wait_for(ctx.broker.depth(TASK_QUEUE), 2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {type(exc).__name__}"
    if getattr(ctx.cache, "degraded", False):
        checks["cache"] = "degraded: status reads come from the database"
    else:
        checks["cache"] = "ok"
    storage = ctx.storage
    if getattr(storage, "degraded", False) and time.time() - storage.failed_at >= storage.recheck_s:
        with contextlib.suppress(Exception):  # clears the flag when the store answers again
            await asyncio.wait_for(storage.check(), 3)
    if getattr(storage, "degraded", False):
        checks["storage"] = "degraded: the last write or read failed"
    else:
        checks["storage"] = "ok"
    if checks["database"] != "ok":
        status, code = "down", 503
    elif checks["broker"] != "ok" or checks["cache"] != "ok" or checks["storage"] != "ok":
        status, code = "degraded", 200
    else:
        status, code = "ok", 200
    return web.json_response({"status": status, **checks}, status=code)


@route("GET", "/api/openapi.json", permission="public", summary="This API described as OpenAPI 3.1")
async def openapi(request: web.Request) -> web.Response:
    """Built from the route registry, so every route is described."""
    return web.json_response(build_openapi())


def build_openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every registered route, with its permission as ``x-permission``."""
    schemas: dict[str, Any] = {
        "ErrorBody": ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    }
    paths: dict[str, Any] = {}

    def ref(model: Any) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    for info, handler in ROUTES:
        path = info.path.replace("{key:.+}", "{key}")
        integer_path = {"frame"}
        op: dict[str, Any] = {
            "summary": info.summary,
            "operationId": handler.__name__,
            "x-permission": info.permission,
            "parameters": [
                {
                    "name": p,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "integer"} if p in integer_path else {"type": "string"},
                }
                for p in _path_params(path)
            ]
            + [
                {
                    "name": k,
                    "in": "query",
                    "required": k in ("lease_id",) or (k == "filename" and info.path == "/api/models"),
                    "description": v,
                    "schema": {"type": "integer"}
                    if k in info.integer_query
                    else {"type": "string", "minLength": 1},
                }
                for k, v in info.query.items()
            ],
            "responses": {
                "4XX": {
                    "description": "error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                },
            },
        }
        ok: dict[str, Any] = {"description": "success"}
        if info.response is not None:
            ok["content"] = {"application/json": {"schema": ref(info.response)}}
        elif info.response_content != "application/json":
            ok["content"] = {info.response_content: {"schema": {"type": "string", "format": "binary"}}}
        else:
            ok["content"] = {"application/json": {"schema": {"type": "object"}}}
        op["responses"][str(info.status)] = ok
        for code, why in info.also.items():
            if code >= 400:
                op["responses"][str(code)] = {
                    "description": why,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                }
            else:
                op["responses"][str(code)] = {**ok, "description": why}
        op["security"], op["x-roles"] = _security(info.permission)
        if info.scope:
            op["x-scope"] = info.scope
        if info.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(info.body)}},
            }
        elif info.request_content:
            content: dict[str, Any] = {
                ctype.strip(): {"schema": {"type": "string", "format": "binary"}}
                for ctype in info.request_content.split(",")
            }
            if "multipart/form-data" in content:
                content["multipart/form-data"] = {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                }
            op["requestBody"] = {"required": True, "content": content}
        paths.setdefault(path, {})[info.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "renderfarm",
            "version": "0.1.0",
            "description": "Render farm for Blender. Each operation's `x-permission` names the permission "
            "it needs and `x-roles` the roles that hold it (`admin` is global; `manager`, `artist` and "
            "`viewer` are held per project, and `(own)` means on the caller's own jobs only). An object "
            "of a project the caller has no role in answers 404.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "accessToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "a 15-minute access token from POST /api/auth/login or /api/auth/refresh "
                    "(HS256, with kid)",
                },
                "apiToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a personal API token (rfp_...) from POST /api/tokens or "
                    "`renderfarm login`",
                },
                "agentToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an agent token (rfa_...) bound to one agent name, from "
                    "POST /api/agent-tokens or `renderfarm token create --agent NAME`",
                },
            },
        },
    }


def _security(permission: str) -> tuple[list[dict[str, list[str]]], list[str]]:
    """The OpenAPI ``security`` of a permission, and the roles that hold it."""
    if permission == "public":
        return [], []
    if permission == "agent":
        return [{"agentToken": []}], ["agent"]
    user = [{"accessToken": []}, {"apiToken": []}]
    if permission == "self":
        return user, ["any user"]
    return user, roles_with(permission)


def _path_params(path: str) -> list[str]:
    out, i = [], 0
    while (i := path.find("{", i)) != -1:
        j = path.index("}", i)
        out.append(path[i + 1 : j])
        i = j
    return out
