"""Outbox relay: publishes committed outbox rows to the broker, highest priority first."""

from __future__ import annotations

import json

from sqlalchemy import select

from server.context import FarmContext
from server.persistence.tables import OutboxMessage, utcnow


async def relay_once(ctx: FarmContext, batch: int = 500) -> int:
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
        now = utcnow()
        for row in rows:
            row.published_at = now
        await s.commit()
    return len(rows)
