"""Audit log append-only in the database: MySQL/MariaDB triggers refuse UPDATE and DELETE.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

On MySQL/MariaDB three triggers, ``audit_log_no_update`` (BEFORE UPDATE),
``audit_log_no_delete`` (BEFORE DELETE) and ``audit_head_no_delete`` (BEFORE DELETE on
``audit_head``), raise ``SQLSTATE '45000'`` (error 1644) for every row, so no statement can
change or remove audit rows or the head, even one run by hand with the application's
account. They do not stop ``TRUNCATE``, ``DROP`` or someone who may drop triggers;
:func:`server.audit.log.verify` detects those changes from the hash chain (and the API's
verify, an emptied log on a farm that has users).

Creating triggers needs the ``TRIGGER`` privilege, and with binary logging on also
``SUPER`` (or ``log_bin_trust_function_creators``). An account without them gets a
warning in the log and no triggers, rather than a server that cannot start: the triggers
are a second line of defence. On SQLite this revision does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from alembic import op
from sqlalchemy.exc import DBAPIError

from server.persistence.retry import mysql_error_code

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger(__name__)

TRIGGERS = {
    "audit_log_no_update": ("audit_log", "UPDATE"),
    "audit_log_no_delete": ("audit_log", "DELETE"),
    "audit_head_no_delete": ("audit_head", "DELETE"),
}
"""Trigger name -> the table and the statement it refuses (the head may move on, never go)."""
PRIVILEGE_ERRORS = frozenset({1142, 1227, 1419})
"""MySQL/MariaDB errors meaning the account may not create triggers (TRIGGER command denied,
SUPER needed, SUPER needed with binary logging)."""


def _mysql() -> bool:
    return op.get_context().dialect.name in ("mysql", "mariadb")


def upgrade() -> None:
    """Create the triggers on MySQL/MariaDB (a warning instead when the account may not)."""
    if not _mysql():
        return
    for name, (table, statement) in TRIGGERS.items():
        try:
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {statement} ON {table} FOR EACH ROW "
                "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = "
                f"'the audit log is append-only: {statement} refused'"
            )
        except DBAPIError as exc:
            if mysql_error_code(exc) not in PRIVILEGE_ERRORS:
                raise
            log.warning(
                "audit_log is append-only by the application only: this database account may not "
                "create triggers (MySQL error %s); grant TRIGGER (and SUPER, or set "
                "log_bin_trust_function_creators, when binary logging is on) and create them by hand "
                "as in migration 0003",
                mysql_error_code(exc),
            )
            return


def downgrade() -> None:
    """Drop the triggers (MySQL/MariaDB)."""
    if not _mysql():
        return
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
