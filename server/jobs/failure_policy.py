"""The failure policy: what a failed attempt does to its task, its agent and its job.

* A failed attempt is recorded (``task_failures``) and its task goes back to the queue for
  *another* agent after an exponential backoff, until ``task_failure_agents`` different
  agents failed it, or at once for good when no other agent may take it (a disabled agent
  may not: ``PATCH /api/agents/{name}``).
* An agent with ``blocklist_after`` failures in a job not cleared is blocklisted for it: it
  is refused the job's tasks (:func:`refusal`) until someone clears it.
* A job fails early, its other tasks canceled, when no eligible agent remains or more than
  ``max_failed_task_share`` of its tasks failed for good.

Each function works inside the caller's transaction (session ``s``); the caller commits and
publishes. The settings are :class:`server.config.Settings`'s.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.devices import route_backends, satisfies
from server.context import FarmContext
from server.jobs import task_state_machine as sm
from server.persistence.tables import Agent, Job, Task, TaskFailure

log = logging.getLogger(__name__)

REDISPATCH_DELAY_S = 2.0
"""Seconds a task refused to an agent that failed it (or is blocklisted for its job) waits
before it is dispatched again, so that another agent gets the message."""
AGENT_GONE_S = 3600.0
"""Seconds after its last heartbeat an agent no longer counts as one that may take a failed task
(a machine taken out of the farm without stopping its agent); an agent that stopped cleanly
(``offline``) never counts. The task would otherwise wait for it for ever."""


async def refusal(
    ctx: FarmContext, s: AsyncSession, task: Task, job: Job, agent: str, route: str
) -> tuple[str, float]:
    """Why ``agent`` (of ``route``) may not take ``task`` and how long the task then waits
    (seconds); ``("", 0)`` when it may."""
    if not satisfies(job.device, route_backends(route)):
        offers = ", ".join(route_backends(route)) or "no GPU backend"
        return (
            f"task {task.id} is for device {job.device}; agent {agent!r} offers {offers} (route {route}), "
            "so it goes to another agent",
            0.0,
        )
    if agent in (task.failed_agents or []):
        return f"agent {agent!r} already failed task {task.id}; it goes to another agent", REDISPATCH_DELAY_S
    after = ctx.settings.blocklist_after
    if 0 < after <= job.failures:  # else no agent has failed enough of the job's attempts
        failures = await s.scalar(
            select(func.count())
            .select_from(TaskFailure)
            .where(TaskFailure.job_id == job.id, TaskFailure.agent == agent, TaskFailure.cleared_at.is_(None))
        )
        if (failures or 0) >= after:
            return (
                f"agent {agent!r} is blocklisted for job {job.id} ({failures} failed attempts); "
                f"clear it with DELETE /api/jobs/{job.id}/blocklist/{agent}",
                REDISPATCH_DELAY_S,
            )
    return "", 0.0


async def blocklisted(s: AsyncSession, job_id: str, after: int) -> set[str]:
    """Names of the agents blocklisted for a job: ``after`` or more failures in it not cleared
    (an empty set when ``after`` is 0). One seek on ``ix_task_failures_job_agent``."""
    if after <= 0:
        return set()
    rows = await s.scalars(
        select(TaskFailure.agent)
        .where(TaskFailure.job_id == job_id, TaskFailure.cleared_at.is_(None), TaskFailure.agent != "")
        .group_by(TaskFailure.agent)
        .having(func.count() >= after)
    )
    return set(rows.all())


async def fail_attempt(
    ctx: FarmContext, s: AsyncSession, task: Task, job: Job, kind: str, message: str, now: Any
) -> tuple[str, str, list[Task]]:
    """Apply the failure policy to a failed attempt of ``task`` (running, leased) in session ``s``.

    * The failure is recorded (``task_failures``) and the agent joins the task's failed agents.
    * The task goes back to the queue with ``not_before`` = now + the backoff
      (:meth:`server.config.Settings.retry_delay_s` of its failures so far), unless
      ``task_failure_agents`` different agents failed it, or no other eligible agent exists
      (registered in the job's pool, not disabled, and not stopped or gone for
      :data:`AGENT_GONE_S` seconds, offering its device, not blocklisted for the job, not
      among those that failed the task): then it fails for good.
    * The job fails at once, its other queued and running tasks canceled, when every such
      agent offering its device is blocklisted for it, or when more than
      ``max_failed_task_share`` of its tasks failed for good while some are still unfinished.

    Returns:
        ``(task state, task message, the other tasks stopped with the job)``; the job's state
        is ``failed`` when it failed here.
    """
    settings = ctx.settings
    agent = task.agent or ""
    # The job's row first: its exclusive lock orders concurrent failures of one job. Inserting
    # the failure first would take a shared lock on it (the foreign key check, InnoDB), and two
    # attempts failing at once would then deadlock upgrading those to update the counter.
    await s.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(failures=Job.failures + 1)
        .execution_options(synchronize_session="evaluate")
    )
    s.add(TaskFailure(job_id=job.id, task_id=task.id, agent=agent, kind=kind, message=message[:4000], at=now))
    failed = list(task.failed_agents or [])
    if agent and agent not in failed:
        failed.append(agent)
    task.failed_agents, task.failure_kind = failed, kind
    task.lease_id, task.lease_expires_at, task.current_frame = None, None, None
    await s.flush()
    blocked = await blocklisted(s, job.id, settings.blocklist_after)
    registered = (
        await s.execute(
            select(Agent.name, Agent.route).where(
                Agent.pool == job.pool,
                Agent.state == "online",
                Agent.enabled.is_(True),
                Agent.last_seen_at >= now - timedelta(seconds=AGENT_GONE_S),
            )
        )
    ).all()
    matching = sorted(n for n, r in registered if satisfies(job.device, route_backends(r or job.pool)))
    others = [n for n in matching if n not in blocked and n not in failed]
    where = f"agent {agent}" if agent else "an agent"
    what = f"{kind}: {message}" if message else kind
    if agent and agent in blocked:
        log.info("job %s: agent %s is blocklisted (%s failures)", job.id, agent, settings.blocklist_after)
    final = ""
    if len(failed) >= settings.task_failure_agents:
        final = f"{what} (failed on {len(failed)} agent(s): {', '.join(failed)})"
    elif not others:
        final = (
            f"{what} (failed on {where}; no other agent may take it: none offering {job.device} in pool "
            f"{job.pool} that has not failed it and is not blocklisted for this job)"
        )
    if final:
        sm.check_task_transition(task.state, sm.FAILED)
        task.state, task.message, task.finished_at = sm.FAILED, final[:4000], now
    else:
        sm.check_task_transition(task.state, sm.QUEUED)
        count = await s.scalar(
            select(func.count()).select_from(TaskFailure).where(TaskFailure.task_id == task.id)
        )
        delay = settings.retry_delay_s(count or 1)
        task.state, task.dispatched_at, task.route = sm.QUEUED, None, None
        task.not_before = now + timedelta(seconds=delay)
        task.message = f"retrying on another agent in {delay:g} s; failed on {where}: {what}"[:4000]
    why = ""
    if matching and all(n in blocked for n in matching):
        why = (
            f"no eligible agent remains: every agent offering {job.device} in pool {job.pool} is "
            f"blocklisted for this job ({', '.join(matching)}); last failure: {what}"
        )
    elif final and settings.max_failed_task_share < 1:
        rows = await s.execute(
            select(Task.state, func.count()).where(Task.job_id == job.id).group_by(Task.state)
        )
        counts = dict(rows.all())
        total = sum(counts.values())
        lost = counts.get(sm.FAILED, 0)
        if (
            total
            and lost / total > settings.max_failed_task_share
            and (counts.get(sm.QUEUED, 0) or counts.get(sm.RUNNING, 0))
        ):
            why = (
                f"{lost} of {total} tasks failed, more than max_failed_task_share "
                f"({settings.max_failed_task_share:g}); last failure: {what}"
            )
    stopped: list[Task] = []
    if why:
        stopped = await fail_job(s, job, why, now)
    return task.state, task.message, stopped


async def fail_job(s: AsyncSession, job: Job, why: str, now: Any) -> list[Task]:
    """Fail ``job`` now: its queued and running tasks are canceled (running agents get 409 at
    their next heartbeat). Returns the tasks it stopped."""
    job.state, job.finished_at = sm.FAILED, now
    job.message = f"job failed early: {why}"[:4000]
    short = why if len(why) <= 300 else why[:297] + "..."
    await s.execute(
        update(Agent)
        .where(
            Agent.current_task_id.in_(
                select(Task.id).where(Task.job_id == job.id, Task.state == sm.RUNNING).scalar_subquery()
            )
        )
        .values(current_task_id=None)
        .execution_options(synchronize_session=False)
    )
    await s.execute(
        update(Task)
        .where(Task.job_id == job.id, Task.state.in_([sm.QUEUED, sm.RUNNING]))
        .values(
            state=sm.CANCELED,
            finished_at=now,
            message=f"not rendered: the job failed ({short})",
            lease_id=None,
            lease_expires_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    stopped = list(
        (
            await s.scalars(
                select(Task)
                .where(Task.job_id == job.id, Task.state == sm.CANCELED, Task.finished_at == now)
                .execution_options(populate_existing=True)
            )
        ).all()
    )
    log.warning("job %s failed early: %s", job.id, why)
    return stopped
