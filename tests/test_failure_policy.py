"""The failure policy (issue 5, part 4) against a real in-process farm, with agents simulated over
the agent HTTP API (claim, heartbeat, upload, result; no Blender): retries on another agent
after a backoff, failed for good after N agents, the per-job blocklist (API and CLI), and jobs
that fail early. Failure kinds and messages are what an agent reports.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from cli.main import main as cli_main
from protocol.messages import TASK_QUEUE
from server.config import Settings, load_settings
from server.persistence.tables import Agent, AuditEntry, TaskFailure, utcnow
from tests.conftest import Farm, farm_on
from tests.simagents import (
    SimAgent,
    both_backends,  # noqa: F401  (fixture)
    quiet,
    submit,
    take,
    task_rows,
)

pytestmark = pytest.mark.agents(0)


def policy(farm: Farm, **kw: Any) -> None:
    """Set failure-policy settings of the running farm (read at each result and dispatch)."""
    for name, value in kw.items():
        setattr(farm.settings, name, value)
    farm.settings.check()


async def failures(farm: Farm, job_id: str) -> list[TaskFailure]:
    async with farm.ctx.db.session() as s:
        rows = await s.scalars(
            select(TaskFailure).where(TaskFailure.job_id == job_id).order_by(TaskFailure.id)
        )
        return list(rows.all())


async def cli(farm: Farm, *args: str) -> Any:
    """``renderfarm ARGS --server <farm>`` with the admin's token, in a thread."""
    env = {"RENDERFARM_TOKEN": farm.token, "RENDERFARM_SERVER": ""}
    return await asyncio.to_thread(
        CliRunner().invoke, cli_main, [*args, "--server", farm.url], env=env, catch_exceptions=False
    )


def flat(text: str) -> str:
    """``text`` with rich's line wrapping undone."""
    return " ".join(text.split())


async def test_a_failed_attempt_is_retried_on_another_agent_after_the_backoff(farm: Farm) -> None:
    policy(farm, retry_backoff_s=1.5, retry_backoff_max_s=10.0)
    a = await SimAgent.start(farm, "node-a")
    b = await SimAgent.start(farm, "node-b")
    job = await submit(farm, 1)
    [tid] = await take(farm, TASK_QUEUE, 1)
    status, spec = await a.claim(tid)
    assert status == 200, spec
    failed_at = time.monotonic()
    res = await a.fail(
        tid, spec["lease_id"], kind="crashed", message="Blender crashed (crash report in the log)"
    )
    assert res["state"] == "queued", res
    assert res["message"].startswith("retrying on another agent in 1.5 s; failed on agent node-a")
    [task] = await farm.client.tasks(job["id"])
    assert task["state"] == "queued" and task["failed_agents"] == ["node-a"]
    assert task["failure_kind"] == "crashed" and task["not_before"] is not None
    [row] = await failures(farm, job["id"])
    assert (row.agent, row.kind, row.message, row.cleared_at) == (
        "node-a",
        "crashed",
        "Blender crashed (crash report in the log) (frames missing: 1)",
        None,
    )

    assert await quiet(farm, TASK_QUEUE, 1.0) == []  # not before the backoff
    [again] = await take(farm, TASK_QUEUE, 1, timeout_s=5)
    assert again == tid and time.monotonic() - failed_at >= 1.4
    [t] = await task_rows(farm, job["id"])
    assert t.dispatched_at is not None and t.dispatched_at - row.at >= timedelta(seconds=1.5)

    status, body = await a.claim(tid)  # the agent that failed it does not get it again
    assert status == 409 and "already failed" in body["error"]["message"], body
    [third] = await take(farm, TASK_QUEUE, 1, timeout_s=5)  # handed back, sent again
    assert third == tid
    status, spec = await b.claim(tid)
    assert status == 200, spec
    await b.complete(spec)
    summary = await farm.client.job(job["id"])
    assert summary["state"] == "completed" and summary["frames_done"] == 1, summary
    [task] = await farm.client.tasks(job["id"])
    assert task["agent"] == "node-b" and task["attempts"] == 2 and task["failed_agents"] == ["node-a"]


async def test_a_task_fails_for_good_once_n_agents_failed_it(farm: Farm) -> None:
    policy(farm, task_failure_agents=2, retry_backoff_s=0.1, retry_backoff_max_s=0.1)
    a = await SimAgent.start(farm, "node-a")
    b = await SimAgent.start(farm, "node-b")
    await SimAgent.start(farm, "node-c")  # could take it, but two agents failing it is enough
    job = await submit(farm, 1)
    [tid] = await take(farm, TASK_QUEUE, 1)
    spec = (await a.claim(tid))[1]
    assert (await a.fail(tid, spec["lease_id"], kind="oom", message="out of memory"))["state"] == "queued"
    await take(farm, TASK_QUEUE, 1)
    spec = (await b.claim(tid))[1]
    res = await b.fail(tid, spec["lease_id"], kind="python_error", message="Traceback: KeyError 'x'")
    assert res["state"] == "failed", res
    assert "failed on 2 agent(s): node-a, node-b" in res["message"]
    assert res["message"].startswith("python_error: Traceback: KeyError 'x'")
    [task] = await farm.client.tasks(job["id"])
    assert task["failed_agents"] == ["node-a", "node-b"] and task["failure_kind"] == "python_error"
    summary = await farm.client.job(job["id"])
    assert summary["state"] == "failed" and "python_error" in summary["message"]
    assert [(f.agent, f.kind) for f in await failures(farm, job["id"])] == [
        ("node-a", "oom"),
        ("node-b", "python_error"),
    ]


async def test_a_one_agent_farm_fails_a_task_at_once(farm: Farm) -> None:
    """No other agent could take it, so the task fails at once, without a backoff (as before
    the policy); the job's other task still renders. Agents of another pool, stopped ones and
    ones not heard from for over an hour do not count."""
    policy(farm, retry_backoff_s=60.0, retry_backoff_max_s=60.0)
    await SimAgent.start(farm, "blue-1", pool="blue")
    retired = await SimAgent.start(farm, "retired")
    status, _ = await retired.call("POST", "/api/agent/heartbeat", {"stopping": True})
    assert status == 200
    await SimAgent.start(farm, "unplugged")
    async with farm.ctx.db.session() as s:
        await s.execute(
            update(Agent).where(Agent.name == "unplugged").values(last_seen_at=utcnow() - timedelta(hours=2))
        )
        await s.commit()
    a = await SimAgent.start(farm, "solo")
    job = await submit(farm, 2)
    first, second = await take(farm, TASK_QUEUE, 2)
    spec = (await a.claim(first))[1]
    status, body = await a.call(
        "POST",
        f"/api/agent/tasks/{first}/result",
        {"lease_id": spec["lease_id"], "status": "failed", "kind": "x"},
    )
    assert status == 400 and body["error"]["field"] == "kind", body  # kinds are checked
    res = await a.call(
        "POST", f"/api/agent/tasks/{first}/result", {"lease_id": spec["lease_id"], "status": "completed"}
    )
    assert res[0] == 200 and res[1]["state"] == "failed", res  # completed, but no frame was stored
    assert "frames missing after render: 1" in res[1]["message"]
    assert "no other agent may take it" in res[1]["message"]
    spec = (await a.claim(second))[1]
    await a.complete(spec)
    summary = await farm.client.job(job["id"])
    assert summary["state"] == "failed" and summary["tasks"]["completed"] == 1, summary
    tasks = await farm.client.tasks(job["id"])
    assert [t["failure_kind"] for t in tasks] == ["frames_missing", ""]


async def test_an_agent_is_blocklisted_after_m_failures_visible_and_clearable(farm: Farm) -> None:
    policy(farm, blocklist_after=2, task_failure_agents=3, retry_backoff_s=0.1, retry_backoff_max_s=0.1)
    a = await SimAgent.start(farm, "node-a")
    await SimAgent.start(farm, "node-b")
    job = await submit(farm, 4)
    tids = [t.id for t in await task_rows(farm, job["id"])]
    for tid, kind in zip(tids[:2], ("oom", "stalled"), strict=True):
        spec = (await a.claim(tid))[1]
        assert (await a.fail(tid, spec["lease_id"], kind=kind, message=f"{kind} on node-a"))[
            "state"
        ] == "queued"

    summary = await farm.client.job(job["id"])
    assert summary["blocklist"] == ["node-a"] and summary["state"] == "queued"  # node-b may render it
    listed = await farm.client.blocklist(job["id"])
    assert listed["blocklist_after"] == 2
    [entry] = listed["agents"]
    assert entry["agent"] == "node-a" and entry["failures"] == 2 and entry["kinds"] == ["oom", "stalled"]
    assert entry["last_message"] == "stalled on node-a (frames missing: 2)"
    status, body = await a.claim(tids[2])
    assert status == 409 and "blocklisted" in body["error"]["message"], body

    res = await cli(farm, "blocklist", job["id"])
    assert res.exit_code == 0 and "node-a" in res.stdout and "oom, stalled" in res.stdout, res.output
    res = await cli(farm, "blocklist", job["id"], "--clear", "node-b")
    assert res.exit_code == 2 and "not blocklisted" in flat(res.stderr), res.output
    res = await cli(farm, "blocklist", job["id"], "--clear", "node-a")
    assert res.exit_code == 0 and "2 failure(s) cleared" in flat(res.stderr), res.output

    assert (await farm.client.blocklist(job["id"]))["agents"] == []
    assert (await farm.client.job(job["id"]))["blocklist"] == []
    rows = {t.id: t for t in await task_rows(farm, job["id"])}
    assert rows[tids[0]].failed_agents == [] and rows[tids[1]].failed_agents == []
    assert all(f.cleared_at is not None for f in await failures(farm, job["id"]))
    status, spec = await a.claim(tids[0])  # it may take the job's tasks again, even one it failed
    assert status == 200, spec
    async with farm.ctx.db.session() as s:
        audit = (await s.scalars(select(AuditEntry).where(AuditEntry.action == "jobs.clear_blocklist"))).all()
    assert [(e.outcome, e.detail.get("agent"), e.detail.get("cleared")) for e in audit] == [
        ("failure", None, None),
        ("success", "node-a", 2),
    ]

    # a finished job has nothing left to render: clearing is refused, saying so
    await farm.client.cancel(job["id"])
    res = await cli(farm, "blocklist", job["id"], "--clear", "node-a")
    assert res.exit_code != 0 and "has already finished (canceled)" in flat(res.stderr), res.output


async def test_the_job_fails_when_no_eligible_agent_remains(
    both_backends: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Every agent of the pool blocklisted: the job fails, its other tasks canceled, and an agent
    still rendering one of them is told to stop (409) at its next heartbeat."""
    async with farm_on(
        tmp_path, both_backends, blocklist_after=1, task_failure_agents=3, retry_backoff_s=0.1
    ) as farm:
        a = await SimAgent.start(farm, "node-a")
        b = await SimAgent.start(farm, "node-b")
        await SimAgent.start(farm, "gpu-elsewhere", ["CUDA"], pool="blue")  # not of the job's pool
        job = await submit(farm, 4)
        t0, t1, t2, t3 = [t.id for t in await task_rows(farm, job["id"])]
        s0 = (await a.claim(t0))[1]
        s2 = (await a.claim(t2))[1]
        s1 = (await b.claim(t1))[1]
        assert (await a.fail(t0, s0["lease_id"], kind="killed"))["state"] == "queued"  # node-b may take it
        assert (await farm.client.job(job["id"]))["state"] == "running"
        res = await b.fail(t1, s1["lease_id"], kind="timeout", message="timed out after 3600 s")
        assert res["state"] == "failed", res
        summary = await farm.client.job(job["id"])
        assert summary["state"] == "failed", summary
        assert "no eligible agent remains" in summary["message"] and "node-a, node-b" in summary["message"]
        assert summary["blocklist"] == ["node-a", "node-b"]
        status, body = await a.heartbeat(t2, s2["lease_id"])
        assert status == 409, body  # node-a stops rendering t2
        states = {t["id"]: (t["state"], t["message"]) for t in await farm.client.tasks(job["id"])}
        assert states[t1][0] == "failed"
        for tid in (t0, t2, t3):
            assert states[tid][0] == "canceled" and states[tid][1].startswith("not rendered: the job failed")
        agents = {x["name"]: x for x in await farm.client.agents()}
        assert agents["node-a"]["current_task_id"] is None


async def test_the_job_fails_past_the_share_of_failed_tasks(farm: Farm) -> None:
    policy(farm, max_failed_task_share=0.3, task_failure_agents=1)
    a = await SimAgent.start(farm, "node-a")
    b = await SimAgent.start(farm, "node-b")
    job = await submit(farm, 4)
    t0, t1, *_ = [t.id for t in await task_rows(farm, job["id"])]
    spec = (await a.claim(t0))[1]
    assert (await a.fail(t0, spec["lease_id"]))["state"] == "failed"
    assert (await farm.client.job(job["id"]))["state"] == "running"  # 1 of 4: not past 0.3
    spec = (await b.claim(t1))[1]
    assert (await b.fail(t1, spec["lease_id"], kind="device", message="no OPTIX device"))["state"] == "failed"
    summary = await farm.client.job(job["id"])
    assert summary["state"] == "failed" and summary["tasks"] == {
        "queued": 0,
        "running": 0,
        "completed": 0,
        "failed": 2,
        "canceled": 2,
    }
    assert "2 of 4 tasks failed, more than max_failed_task_share (0.3)" in summary["message"]
    assert "device: no OPTIX device" in summary["message"]


async def test_every_task_runs_to_its_end_with_a_share_of_1(farm: Farm) -> None:
    policy(farm, max_failed_task_share=1.0, task_failure_agents=1)
    a = await SimAgent.start(farm, "node-a")
    job = await submit(farm, 3)
    t0, t1, t2 = [t.id for t in await task_rows(farm, job["id"])]
    for tid in (t0, t1):
        spec = (await a.claim(tid))[1]
        await a.fail(tid, spec["lease_id"])
    assert (await farm.client.job(job["id"]))["state"] == "running"
    spec = (await a.claim(t2))[1]
    await a.complete(spec)
    summary = await farm.client.job(job["id"])
    assert summary["state"] == "failed" and summary["frames_done"] == 1
    assert summary["message"].startswith("2 task(s) failed")


def test_failure_policy_settings_are_validated(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    assert (s.task_failure_agents, s.blocklist_after, s.max_failed_task_share) == (3, 3, 0.5)
    assert [s.retry_delay_s(k) for k in (1, 2, 3, 6, 100)] == [10.0, 20.0, 40.0, 300.0, 300.0]
    for kw, says in (
        ({"task_failure_agents": 0}, "task_failure_agents"),
        ({"blocklist_after": -1}, "blocklist_after"),
        ({"retry_backoff_s": 50.0, "retry_backoff_max_s": 20.0}, "retry_backoff_s"),
        ({"retry_backoff_s": -1.0}, "retry_backoff_s"),
        ({"max_failed_task_share": 1.5}, "max_failed_task_share"),
        ({"max_failed_task_share": float("nan")}, "max_failed_task_share"),
    ):
        with pytest.raises(ValueError, match=says):
            Settings(data_dir=tmp_path, **kw)
    with pytest.raises(ValueError, match="task_failure_agents must be a whole number"):
        load_settings(env={"RENDERFARM_TASK_FAILURE_AGENTS": "two"}, data_dir=tmp_path)
    toml = tmp_path / "farm.toml"
    toml.write_text("blocklist_after = 0\nretry_backoff_s = 2.5\nmax_failed_task_share = 1\n")
    got = load_settings(config_file=toml, env={"RENDERFARM_RETRY_BACKOFF_MAX_S": "30"}, data_dir=tmp_path)
    assert (got.blocklist_after, got.retry_backoff_s, got.retry_backoff_max_s, got.max_failed_task_share) == (
        0,
        2.5,
        30.0,
        1.0,
    )


async def test_a_null_device_means_any(farm: Farm) -> None:
    job = await submit(farm, 1, device=None)
    assert job["device"] == "any"


async def test_many_attempts_of_one_job_failing_at_once_on_mariadb(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """12 agents report failures of one job's tasks concurrently: every report is answered
    (the job's row is locked before the failure row's foreign key check, so they queue
    instead of deadlocking), and each failure is recorded once."""
    from tests.production import production_backends

    with production_backends(request) as backends:
        async with farm_on(
            tmp_path, backends, task_failure_agents=1, blocklist_after=0, max_failed_task_share=1.0
        ) as farm:
            agents = [await SimAgent.start(farm, f"n{i}") for i in range(12)]
            job = await submit(farm, 120)
            tids = [t.id for t in await task_rows(farm, job["id"])]
            answers: list[int] = []

            async def work(agent: SimAgent, mine: list[str]) -> None:
                for tid in mine:
                    status, spec = await agent.claim(tid)
                    assert status == 200, spec
                    status, body = await agent.call(
                        "POST",
                        f"/api/agent/tasks/{tid}/result",
                        {"lease_id": spec["lease_id"], "status": "failed", "message": "broken"},
                    )
                    answers.append(status)
                    assert status == 200, body

            await asyncio.gather(*(work(a, tids[i :: len(agents)]) for i, a in enumerate(agents)))
            assert answers == [200] * 120
            assert len(await failures(farm, job["id"])) == 120
            assert (await farm.client.job(job["id"]))["state"] == "failed"
