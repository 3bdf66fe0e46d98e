"""Start-up recovery: the in-process broker forgets its queue when the farm stops.

On start, every task still queued gets a fresh outbox message, so a farm that
was stopped (or killed) mid-job picks its work up again. Tasks that were
running keep their lease until it expires; the timeout checker then requeues
them. A task delivered twice is harmless: the second claim is refused.
"""

from __future__ import annotations

from sqlalchemy import select

from server.context import FarmContext
from server.jobs import task_state_machine as sm
from server.jobs.service import outbox_for
from server.persistence.tables import Job, Task


async def requeue_queued_tasks(ctx: FarmContext) -> int:
    """Add an outbox message for each queued task of an unfinished job; returns how many."""
    async with ctx.db.session() as s:
        rows = (
            await s.execute(
                select(Task, Job)
                .join(Job, Task.job_id == Job.id)
                .where(Task.state == sm.QUEUED, Job.state.not_in(list(sm.FINISHED)))
            )
        ).all()
        for task, job in rows:
            s.add(outbox_for(task, job))
        await s.commit()
    if rows:
        ctx.outbox_ready.set()
    return len(rows)
