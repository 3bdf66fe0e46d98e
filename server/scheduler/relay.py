"""Outbox relay: publishes committed outbox rows to the broker, highest priority first."""

from __future__ import annotations

import json

from sqlalchemy import select, update

from server.context import FarmContext
from server.persistence.tables import OutboxMessage, utcnow

BATCH = 500
"""Outbox rows published per round trip to the broker."""


async def relay_once(ctx: FarmContext, batch: int = BATCH) -> int:
    """Publish up to ``batch`` unpublished outbox rows; returns how many were published.

    A row is marked published only after the broker accepted it, so a crash
    between the two publishes it again (consumers treat a repeated task message
    as a no-op: the claim of a task that is not queued is refused).
    """
    async with ctx.db.session() as s:
        rows = (
            await s.scalars(
                select(OutboxMessage)
                .where(OutboxMessage.published_at.is_(None))
                .order_by(OutboxMessage.priority.desc(), OutboxMessage.id)
                .limit(batch)
            )
        ).all()
        if not rows:
            return 0
        # One batch, confirmed as a whole; a failure publishes the whole batch again later.
        await ctx.broker.publish_many(
            (row.queue, json.dumps(row.payload).encode(), row.priority) for row in rows
        )
        await s.execute(  # one statement, not one UPDATE per row
            update(OutboxMessage)
            .where(OutboxMessage.id.in_([row.id for row in rows]))
            .values(published_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        await s.commit()
    return len(rows)
