"""Retrying a job's failed tasks (``POST /api/jobs/{id}/retry``) and enabling or disabling a node
agent (``PATCH /api/agents/{name}``, ``renderfarm agents --disable/--enable``), against a real
in-process farm with agents simulated over the agent HTTP API (tests/simagents.py; no Blender).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from click.testing import CliRunner
from sqlalchemy import create_engine, select, text

from cli.main import main as cli_main
from protocol.messages import TASK_QUEUE
from server.auth import service as auth
from server.persistence.migrate import alembic_config
from server.persistence.tables import AuditEntry, Model, TaskFailure
from tests.conftest import Farm
from tests.simagents import SimAgent, quiet, submit, take, task_rows, until

pytestmark = pytest.mark.agents(0)

PASSWORD = "retry-password-0123"


def policy(farm: Farm, **kw: Any) -> None:
    """Set failure-policy settings of the running farm (read at each result and dispatch)."""
    for name, value in kw.items():
        setattr(farm.settings, name, value)
    farm.settings.check()


async def http(farm: Farm, method: str, path: str, token: str | None = None, **kw: Any) -> tuple[int, Any]:
    """``(status, JSON body)`` of one request, with the admin's token unless ``token`` is given."""
    headers = {"Authorization": f"Bearer {token or farm.token}"}
    async with farm.client.http.request(method, farm.url + path, headers=headers, **kw) as r:
        return r.status, await r.json(content_type=None)


async def retry(farm: Farm, job_id: str, token: str | None = None) -> tuple[int, Any]:
    return await http(farm, "POST", f"/api/jobs/{job_id}/retry", token)


async def set_enabled(farm: Farm, name: str, enabled: bool, token: str | None = None) -> tuple[int, Any]:
    return await http(farm, "PATCH", f"/api/agents/{name}", token, json={"enabled": enabled})


async def failures(farm: Farm, job_id: str) -> list[TaskFailure]:
    async with farm.ctx.db.session() as s:
        rows = await s.scalars(
            select(TaskFailure).where(TaskFailure.job_id == job_id).order_by(TaskFailure.id)
        )
        return list(rows.all())


async def audit(farm: Farm, action: str) -> list[AuditEntry]:
    async with farm.ctx.db.session() as s:
        return list((await s.scalars(select(AuditEntry).where(AuditEntry.action == action))).all())


async def agents_by_name(farm: Farm) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in await farm.client.agents()}


async def cli(farm: Farm, *args: str, token: str | None = None) -> Any:
    """``renderfarm ARGS --server <farm>`` with the admin's token (or ``token``), in a thread."""
    env = {"RENDERFARM_TOKEN": token or farm.token, "RENDERFARM_SERVER": ""}
    return await asyncio.to_thread(
        CliRunner().invoke, cli_main, [*args, "--server", farm.url], env=env, catch_exceptions=False
    )


def flat(text: str) -> str:
    """``text`` with rich's line wrapping undone."""
    return " ".join(text.split())


# ---------------------------------------------------------------- retry


async def test_a_job_whose_task_failed_for_good_is_retried_and_completes(farm: Farm) -> None:
    policy(farm, task_failure_agents=1, max_failed_task_share=1.0)
    a = await SimAgent.start(farm, "node-a")
    b = await SimAgent.start(farm, "node-b")
    job = await submit(farm, 2)
    t0, t1 = [t.id for t in await task_rows(farm, job["id"])]
    assert set(await take(farm, TASK_QUEUE, 2)) == {t0, t1}
    spec = (await a.claim(t0))[1]
    res = await a.fail(t0, spec["lease_id"], kind="crashed", message="Blender crashed")
    assert res["state"] == "failed", res  # one agent failing it is enough here
    await b.complete((await b.claim(t1))[1])
    before = await farm.client.job(job["id"])
    assert before["state"] == "failed" and before["finished_at"] is not None, before

    status, summary = await retry(farm, job["id"])
    assert status == 200, summary
    assert summary["id"] == job["id"] and summary["state"] == "running", summary
    assert summary["finished_at"] is None and summary["tasks"]["queued"] == 1, summary
    assert summary["tasks"]["completed"] == 1 and summary["tasks"]["failed"] == 0, summary
    assert summary["message"] == "retrying 1 failed task(s) (requested by admin)", summary
    assert (await farm.client.job(job["id"]))["state"] == "running"  # the cached summary follows
    [task, _] = await farm.client.tasks(job["id"])
    assert task["state"] == "queued" and task["attempts"] == 1 and task["failure_kind"] == "crashed", task
    assert task["failed_agents"] == [] and task["not_before"] is None and task["finished_at"] is None, task
    [row] = await failures(farm, job["id"])  # the record stays, marked cleared
    assert row.agent == "node-a" and row.kind == "crashed" and row.cleared_at is not None

    [again] = await take(farm, TASK_QUEUE, 1)  # dispatched again, through the outbox
    assert again == t0
    status, spec = await a.claim(t0)  # the agent that failed it may try again
    assert status == 200, spec
    await a.complete(spec)
    done = await farm.client.job(job["id"])
    assert done["state"] == "completed" and done["frames_done"] == 2, done
    assert done["message"] == "" and done["finished_at"] is not None, done
    [task, _] = await farm.client.tasks(job["id"])
    assert task["attempts"] == 2 and task["agent"] == "node-a", task

    status, body = await retry(farm, job["id"])  # a completed job has no failed task
    assert status == 409 and "no failed task" in body["error"]["message"], body
    rows = await audit(farm, "jobs.retry_job")
    assert [(e.outcome, e.status, e.detail.get("failed")) for e in rows] == [
        ("success", 200, 1),
        ("failure", 409, None),
    ]


async def test_retrying_a_job_that_failed_early_brings_back_its_canceled_tasks(farm: Farm) -> None:
    """Every agent blocklisted: the job failed early and canceled its other tasks. A retry
    queues the failed and the canceled tasks, the blocklist is gone, and the job completes."""
    policy(farm, blocklist_after=1, task_failure_agents=3, retry_backoff_s=0.1, retry_backoff_max_s=0.1)
    a = await SimAgent.start(farm, "node-a")
    b = await SimAgent.start(farm, "node-b")
    job = await submit(farm, 3)
    t0, t1, t2 = [t.id for t in await task_rows(farm, job["id"])]
    s0 = (await a.claim(t0))[1]
    s1 = (await b.claim(t1))[1]
    assert (await a.fail(t0, s0["lease_id"], kind="oom"))["state"] == "queued"
    assert (await b.fail(t1, s1["lease_id"], kind="oom"))["state"] == "failed"
    failed = await farm.client.job(job["id"])
    assert failed["state"] == "failed" and "no eligible agent remains" in failed["message"], failed
    assert failed["blocklist"] == ["node-a", "node-b"], failed
    assert {t["id"]: t["state"] for t in await farm.client.tasks(job["id"])} == {
        t0: "canceled",
        t1: "failed",
        t2: "canceled",
    }

    status, summary = await retry(farm, job["id"])
    assert status == 200, summary
    assert summary["state"] == "running" and summary["tasks"]["queued"] == 3, summary
    assert summary["blocklist"] == [] and (await farm.client.blocklist(job["id"]))["agents"] == []
    assert "retrying 1 failed task(s) and 2 canceled when the job failed" in summary["message"]
    assert all(f.cleared_at is not None for f in await failures(farm, job["id"]))
    got = set(await take(farm, TASK_QUEUE, 3))
    assert got == {t0, t1, t2}
    for agent, tid in ((b, t0), (a, t1), (a, t2)):  # each failed before, or was blocklisted
        status, spec = await agent.claim(tid)
        assert status == 200, spec
        await agent.complete(spec)
    done = await farm.client.job(job["id"])
    assert done["state"] == "completed" and done["frames_done"] == 3, done


async def test_retry_is_refused_without_failed_tasks_and_for_a_canceled_job(farm: Farm) -> None:
    await SimAgent.start(farm, "node-a")
    job = await submit(farm, 2)
    status, body = await retry(farm, job["id"])
    assert status == 409, body
    assert body["error"]["message"] == f"job {job['id']} has no failed task to retry (it is queued)", body
    await farm.client.cancel(job["id"])
    status, body = await retry(farm, job["id"])
    assert status == 409 and "was canceled" in body["error"]["message"], body
    status, body = await retry(farm, "0" * 32)
    assert status == 404, body
    assert (await farm.client.job(job["id"]))["state"] == "canceled"


async def test_an_artist_retries_only_their_own_jobs(farm: Farm) -> None:
    """``job:update``: an artist retries their own job, not another artist's (403); a manager any
    job of the project; a user of no project sees no such job (404)."""
    async with farm.ctx.db.session() as s:
        default = await auth.find_project(s, "default")
        assert default is not None
        model = Model(
            filename="a.blend",
            kind="blend",
            main="a.blend",
            sha256="0" * 64,
            size_bytes=1,
            storage_key="k",
            project_id=default.id,
        )
        s.add(model)
        await s.commit()
    tokens: dict[str, str] = {}
    for user, role in (("alice", "artist"), ("bob", "artist"), ("carol", "manager"), ("dave", None)):
        await auth.create_user(farm.ctx, user, PASSWORD)
        if role:
            await auth.set_member(farm.ctx, default.id, user, role)
        session, _ = await auth.login(farm.ctx, user, PASSWORD)
        tokens[user] = session.access_token
    policy(farm, task_failure_agents=1)
    a = await SimAgent.start(farm, "node-a")
    status, job = await http(
        farm, "POST", "/api/jobs", tokens["alice"], json={"model_id": model.id, "frames": "1"}
    )
    assert status == 201, job
    [tid] = await take(farm, TASK_QUEUE, 1)
    spec = (await a.claim(tid))[1]
    assert (await a.fail(tid, spec["lease_id"]))["state"] == "failed"

    status, body = await retry(farm, job["id"], tokens["bob"])
    assert status == 403 and "others" in body["error"]["message"], body
    status, body = await retry(farm, job["id"], tokens["dave"])
    assert status == 404 and body["error"]["message"] == f"job {job['id']!r} not found", body
    assert (await farm.client.job(job["id"]))["state"] == "failed"  # neither changed anything
    status, body = await retry(farm, job["id"], tokens["alice"])
    assert status == 200 and body["state"] == "running", body
    await take(farm, TASK_QUEUE, 1)
    spec = (await a.claim(tid))[1]
    assert (await a.fail(tid, spec["lease_id"]))["state"] == "failed"
    status, body = await retry(farm, job["id"], tokens["carol"])  # a manager: any job of the project
    assert status == 200 and body["state"] == "running", body
    assert "requested by carol" in body["message"]


# ---------------------------------------------------------------- enable / disable


async def test_a_disabled_agent_gets_no_new_task_and_finishes_the_one_it_renders(farm: Farm) -> None:
    a = await SimAgent.start(farm, "node-a")
    b = await SimAgent.start(farm, "node-b")
    listed = await agents_by_name(farm)
    assert listed["node-a"]["enabled"] is True and listed["node-b"]["enabled"] is True

    first = await submit(farm, 1)
    [running] = await take(farm, TASK_QUEUE, 1)
    status, spec = await a.claim(running)
    assert status == 200, spec
    status, agent = await set_enabled(farm, "node-a", False)
    assert status == 200, agent
    assert agent["name"] == "node-a" and agent["enabled"] is False and agent["online"] is True, agent
    assert agent["current_task_id"] == running
    listed = await agents_by_name(farm)
    assert listed["node-a"]["enabled"] is False and listed["node-a"]["online"] is True
    assert listed["node-b"]["enabled"] is True

    # the task it renders runs to its end: heartbeats, frames and the result are accepted
    status, body = await a.heartbeat(running, spec["lease_id"])
    assert status == 200 and body == {"cancel": False}, body
    await a.beat()  # it keeps heartbeating as an agent
    await a.complete(spec)
    assert (await farm.client.job(first["id"]))["state"] == "completed"

    # a new task: its claim is refused, and the task reaches the other agent
    job = await submit(farm, 1)
    [tid] = await take(farm, TASK_QUEUE, 1)
    status, body = await a.claim(tid)
    assert status == 409, body
    assert body["error"]["message"].startswith("agent 'node-a' is disabled: it takes no new task"), body
    [again] = await take(farm, TASK_QUEUE, 1)  # handed back to the dispatcher, sent again
    assert again == tid
    status, spec = await b.claim(tid)
    assert status == 200, spec
    await b.complete(spec)
    assert (await farm.client.job(job["id"]))["state"] == "completed"
    [task] = await farm.client.tasks(job["id"])
    assert task["agent"] == "node-b" and task["attempts"] == 1, task

    # enabled again, it takes work again
    status, agent = await set_enabled(farm, "node-a", True)
    assert status == 200 and agent["enabled"] is True, agent
    job = await submit(farm, 1)
    [tid] = await take(farm, TASK_QUEUE, 1)
    status, spec = await a.claim(tid)
    assert status == 200, spec
    await a.complete(spec)
    assert (await farm.client.job(job["id"]))["state"] == "completed"

    rows = await audit(farm, "nodes.update_agent")
    assert [(e.outcome, e.target, e.detail.get("enabled")) for e in rows] == [
        ("success", "agent=node-a", False),
        ("success", "agent=node-a", True),
    ]


async def test_the_dispatcher_routes_nothing_to_disabled_agents(farm: Farm) -> None:
    """Only disabled agents online: nothing is dispatched (not even to the pool's base queue),
    the job says why; enabled, the task is dispatched at once. A disabled agent is no agent a
    failed task may wait for."""
    await SimAgent.start(farm, "node-a")
    gpu = await SimAgent.start(farm, "rtx-1", ["OPTIX", "CUDA"])
    for name in ("node-a", "rtx-1"):
        assert (await set_enabled(farm, name, False))[0] == 200
    job = await submit(farm, 1)

    async def waiting() -> bool:
        return (await farm.client.job(job["id"]))["message"].startswith("waiting for an agent")

    await until(waiting, what="the job's waiting message")
    summary = await farm.client.job(job["id"])
    assert summary["message"] == (
        "waiting for an agent offering any in pool default that is enabled (disabled: node-a, rtx-1)"
    ), summary
    assert await quiet(farm, TASK_QUEUE, 1.0) == []
    assert await quiet(farm, gpu.queue, 0.1) == []
    [t] = await task_rows(farm, job["id"])
    assert t.dispatched_at is None

    assert (await set_enabled(farm, "rtx-1", True))[0] == 200
    [tid] = await take(farm, gpu.queue, 1)
    assert tid == t.id

    async def cleared() -> bool:
        return (await farm.client.job(job["id"]))["message"] == ""

    await until(cleared, what="the waiting message cleared")
    spec = (await gpu.claim(tid))[1]
    res = await gpu.fail(tid, spec["lease_id"], kind="device", message="no OPTIX device")
    assert res["state"] == "failed", res  # node-a, disabled, may not take it: no other agent may
    assert "no other agent may take it" in res["message"], res


async def test_enabling_is_for_admins_and_names_a_registered_agent(farm: Farm) -> None:
    await SimAgent.start(farm, "node-a")
    await auth.create_user(farm.ctx, "erin", PASSWORD)
    async with farm.ctx.db.session() as s:
        default = await auth.find_project(s, "default")
        assert default is not None
    await auth.set_member(farm.ctx, default.id, "erin", "manager")
    session, _ = await auth.login(farm.ctx, "erin", PASSWORD)
    status, body = await set_enabled(farm, "node-a", False, session.access_token)
    assert status == 403, body
    status, body = await set_enabled(farm, "nobody", False)
    assert status == 404 and body["error"]["message"] == "agent 'nobody' is not registered", body
    for bad in ({"enabled": "no"}, {}, {"enabled": False, "pool": "x"}):
        status, body = await http(farm, "PATCH", "/api/agents/node-a", json=bad)
        assert status == 400, (bad, body)
    assert (await agents_by_name(farm))["node-a"]["enabled"] is True
    status, body = await set_enabled(farm, "node-a", True)  # enabling an enabled agent: no change
    assert status == 200 and body["enabled"] is True, body


async def test_cli_disables_and_enables_agents(farm: Farm) -> None:
    await SimAgent.start(farm, "node-a")
    res = await cli(farm, "agents", "--disable", "node-a")
    assert res.exit_code == 0, res.output
    assert "agent node-a is disabled: it takes no new task" in flat(res.stderr), res.output
    res = await cli(farm, "agents")
    assert res.exit_code == 0 and "ENABLED" in res.stdout, res.output
    [line] = [x for x in res.stdout.splitlines() if "node-a" in x]
    assert "yes" in line.split("node-a")[1] and " no " in line, line  # online yes, enabled no
    res = await cli(farm, "agents", "--json")
    assert '"enabled": false' in res.stdout, res.output
    res = await cli(farm, "agents", "--enable", "node-a", "--json")
    assert res.exit_code == 0 and '"enabled": true' in res.stdout, res.output
    res = await cli(farm, "agents", "--enable", "node-a")
    assert res.exit_code == 0 and "agent node-a is enabled: it takes tasks again" in flat(res.stderr)
    res = await cli(farm, "agents", "--disable", "ghost")
    assert res.exit_code == 2 and "agent 'ghost' is not registered" in flat(res.stderr), res.output
    res = await cli(farm, "agents", "--disable", "node-a", "--enable", "node-a")
    assert res.exit_code == 2 and "not both" in flat(res.output), res.output
    await auth.create_user(farm.ctx, "frank", PASSWORD)
    session, _ = await auth.login(farm.ctx, "frank", PASSWORD)
    res = await cli(farm, "agents", "--disable", "node-a", token=session.access_token)
    assert res.exit_code == 2 and "admin" in flat(res.stderr), res.output
    assert (await agents_by_name(farm))["node-a"]["enabled"] is True


def test_migration_0005_enables_existing_agents(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'rf.db'}"
    cfg = alembic_config()
    cfg.set_main_option("sqlalchemy.url", url)
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
        conn.execute(
            text(
                "INSERT INTO agents (id, name, pool, route, capabilities, version, instance, state,"
                " registered_at, last_seen_at) VALUES ('a', 'node', 'default', 'default', '{}', '', '',"
                " 'online', '2026-01-01', '2026-01-01')"
            )
        )
        command.upgrade(cfg, "head")
        assert conn.execute(text("SELECT enabled FROM agents")).scalar() == 1
        command.downgrade(cfg, "0004")
        assert "enabled" not in {r[1] for r in conn.execute(text("PRAGMA table_info(agents)"))}
        command.upgrade(cfg, "head")
        assert conn.execute(text("SELECT name, enabled FROM agents")).one() == ("node", 1)
    engine.dispose()
