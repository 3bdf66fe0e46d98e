"""``renderfarm agents`` and ``renderfarm blocklist``: the farm's node agents and per-job blocklists.

``agents`` lists the registered agents with their pool, route (pool and GPU backends: the
queue they take tasks from), whether they are online and enabled and what they render now.
``agents --disable NAME`` (admins) stops an agent taking new tasks: its claims are refused
and nothing is routed to it, while a task it is rendering runs to its end; ``--enable NAME``
lets it take tasks again.
``blocklist JOB`` lists the agents blocklisted for a job (too many failed attempts in it);
``blocklist JOB --clear AGENT`` lets one take the job's tasks again (an artist for their own
jobs, a manager for every job of the project).

Data goes to stdout (a table, or the API's JSON with ``--json``); messages to stderr. Exit
status: 0 done; 2 a request the server refused (its message printed).
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.markup import escape

from cli.accounts import _call, _row, _say, _table, _when, json_option, out, printable
from cli.client import FarmClient, _q
from cli.main import main, server_option


@main.command()
@click.option(
    "--disable",
    "disable",
    default=None,
    metavar="NAME",
    help="Admins: agent NAME takes no new task (a task it renders runs to its end).",
)
@click.option(
    "--enable", "enable", default=None, metavar="NAME", help="Admins: agent NAME takes tasks again."
)
@server_option
@json_option
def agents(disable: str | None, enable: str | None, server: str, as_json: bool) -> None:
    """List the registered node agents: pool, route (GPU backends), online, enabled, current task;
    or --disable / --enable one."""
    if disable is not None and enable is not None:
        raise click.UsageError("give --disable or --enable, not both")
    if disable is not None or enable is not None:
        name = disable if disable is not None else enable
        assert name is not None
        enabled = enable is not None

        async def patch(c: FarmClient) -> dict[str, Any]:
            return await c._json("PATCH", f"/api/agents/{_q(name)}", json={"enabled": enabled})

        agent = _call(server, patch)
        if as_json:
            click.echo(json.dumps(agent, indent=2))
        elif agent["enabled"]:
            _say(f"agent {_esc(agent['name'])} is enabled: it takes tasks again")
        else:
            busy = agent.get("current_task_id")
            _say(
                f"agent {_esc(agent['name'])} is disabled: it takes no new task"
                + (f" (task {_esc(busy)}, which it renders now, runs to its end)" if busy else "")
            )
        return
    rows: list[dict[str, Any]] = _call(server, lambda c: c.agents())
    if as_json:
        click.echo(json.dumps({"agents": rows}, indent=2))
        return
    t = _table("NAME", "POOL", "ROUTE", "BACKENDS", "ONLINE", "ENABLED", "TASK", "LAST SEEN")
    for a in rows:
        _row(
            t,
            a["name"],
            a["pool"],
            a.get("route", a["pool"]),
            ", ".join(a.get("backends") or []) or "CPU only",
            "yes" if a["online"] else "no",
            "no" if a.get("enabled") is False else "yes",
            a.get("current_task_id") or "-",
            _when(a.get("last_seen_at")),
        )
    out.print(t)


@main.command()
@click.argument("job_id")
@click.option(
    "--clear", "clear", default=None, metavar="AGENT", help="Clear AGENT's blocklisting for JOB_ID."
)
@server_option
@json_option
def blocklist(job_id: str, clear: str | None, server: str, as_json: bool) -> None:
    """Show the agents blocklisted for JOB_ID (too many failed attempts), or --clear one."""
    if clear is not None:
        agent = clear

        async def clear_it(c: FarmClient) -> dict[str, Any]:
            return await c.clear_blocklist(job_id, agent)

        done = _call(server, clear_it)
        if as_json:
            click.echo(json.dumps(done, indent=2))
        else:
            _say(
                f"agent {_esc(done['agent'])} may take the tasks of job {_esc(done['job_id'])} again "
                f"({done['cleared']} failure(s) cleared)"
            )
        return

    async def read(c: FarmClient) -> dict[str, Any]:
        return await c.blocklist(job_id)

    got = _call(server, read)
    if as_json:
        click.echo(json.dumps(got, indent=2))
        return
    if not got["agents"]:
        after = got["blocklist_after"]
        _say(
            f"no agent is blocklisted for job {_esc(job_id)}"
            + (f" (an agent is after {after} failed attempts in it)" if after else " (blocklisting is off)")
        )
        return
    t = _table("AGENT", "FAILURES", "KINDS", "LAST FAILURE", "LAST MESSAGE")
    for a in got["agents"]:
        _row(
            t,
            a["agent"],
            a["failures"],
            ", ".join(a["kinds"]),
            _when(a["last_failure_at"]),
            a["last_message"],
        )
    out.print(t)


def _esc(text: str) -> str:
    """``text`` safe in rich markup and on a terminal."""
    return escape(printable(str(text)))
