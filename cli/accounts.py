"""``renderfarm login|logout|whoami|user|project|token|audit``: accounts from the command line.

Every command talks to the API with the CLI's token for ``--server`` (``RENDERFARM_TOKEN``,
else the one ``renderfarm login`` stored, see :mod:`cli.credentials`). Data (tables, JSON
with ``--json``, a new token) goes to stdout; messages go to stderr.

Exit status as for every command (:mod:`cli.main`): 0 done; 2 bad usage or a request the
server refused (its message is printed; a 401 says how to log in); ``audit verify`` exits 1
when the audit chain is broken.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli import credentials
from cli.client import ClientError, FarmClient
from cli.main import DEFAULT_SERVER, _check_server, _fail, client_for, console, main, refused, server_option

T = TypeVar("T")
out = Console(highlight=False, soft_wrap=False)
"""The command's data (tables), on stdout."""
ROLES = ("manager", "artist", "viewer")
OUTCOMES = ("success", "failure", "denied", "throttled")


def _say(message: str) -> None:
    """A message on stderr (``message`` is rich markup: escape what is dynamic)."""
    console.print(message, highlight=False)


def _call(server: str, fn: Callable[[FarmClient], Awaitable[T]]) -> T:
    """Run ``fn`` with a client sending the CLI's token; a refused request exits 2."""

    async def go() -> T:
        async with client_for(server) as c:
            try:
                return await fn(c)
            except ClientError as exc:
                refused(exc, server, with_field=True)

    return asyncio.run(go())


def _stored(server: str) -> dict[str, Any] | None:
    try:
        return credentials.stored(server)
    except credentials.CredentialsError as exc:
        _fail(str(exc))


def _password_from_stdin() -> str:
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        _fail("--password-stdin: standard input has no password (its first line is empty)")
    return line


def _new_password(password_stdin: bool) -> str:
    if password_stdin:
        return _password_from_stdin()
    return str(click.prompt("New password", hide_input=True, confirmation_prompt=True, err=True))


def _json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _when(iso: str | None) -> str:
    """``2026-01-02T03:04:05.678Z`` as ``2026-01-02 03:04:05`` (UTC); ``-`` for none."""
    return iso[:19].replace("T", " ") if iso else "-"


def _table(*columns: str) -> Table:
    t = Table(box=None, pad_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def printable(text: str) -> str:
    """``text`` with every control, format or line-separator character (terminal escapes,
    zero-width and bidirectional marks) shown as an escape such as ``\\x1b`` or ``\\u202e``:
    what others typed (a user name tried at login, a token name) must not act on the terminal."""
    out = []
    for c in text:
        if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


def _row(t: Table, *cells: Any) -> None:
    t.add_row(*(escape(printable("" if c is None else str(c))) for c in cells))


def json_option(f: Any) -> Any:
    """``--json``: print the API's answer as JSON instead of a table."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON (the API's answer).")(f)


# ------------------------------------------------------------------ login, logout, whoami


@main.command()
@server_option
@click.option("-u", "--username", default=None, help="User name (asked for when not given).")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from the first line of standard input (for scripts).",
)
@click.option(
    "--days",
    type=click.IntRange(1, 365),
    default=90,
    show_default=True,
    help="Days the stored personal API token stays valid.",
)
def login(server: str, username: str | None, password_stdin: bool, days: int) -> None:
    """Log in to a farm and store a personal API token for the CLI.

    The password is exchanged for a login session, which creates a personal token named
    "renderfarm CLI on <host>" and is then ended; only that token is stored (in the CLI's
    credentials file, readable by you only). A token stored earlier for the same server
    is revoked.
    """
    if password_stdin and not username:
        _fail("--password-stdin needs --username")
    old = _stored(server)
    if not username:
        username = str(click.prompt("User name", err=True)).strip()
    password = (
        _password_from_stdin() if password_stdin else str(click.prompt("Password", hide_input=True, err=True))
    )
    token_name = f"renderfarm CLI on {socket.gethostname()}"
    url = credentials.server_key(server)

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        async with FarmClient(server) as c:
            try:
                session = await c.login(username, password)
            except ClientError as exc:
                message = str(exc)
                if exc.status == 429 and exc.retry_after and "try again" not in message:
                    message += f" (retry after {exc.retry_after:g} s)"
                _fail(message)
            c.token = session["access_token"]
            try:
                me = await c.me()
                created = await c.create_token(token_name, days)
                try:
                    credentials.store(server, created["token"], me["username"], created["id"])
                except credentials.CredentialsError as exc:
                    await c.revoke_token(created["id"])  # an unstored token is of no use to anyone
                    _fail(str(exc))
            except ClientError as exc:
                _fail(f"logged in, but could not create the CLI's token: {exc}")
            finally:
                try:
                    await c.logout_session(session["refresh_token"])
                except ClientError as exc:
                    _say(
                        f"[yellow]warning:[/] could not end the login session ({escape(str(exc))}); "
                        "it expires by itself"
                    )
        old_token = credentials.sendable(old.get("token")) if old else None
        if old and old_token and old.get("token_id") and old_token != created["token"]:
            async with FarmClient(server, old_token) as prev:
                try:  # the replaced token, with itself (it may belong to another user)
                    await prev.revoke_token(old["token_id"])
                except ClientError:
                    pass  # already revoked or expired (401/404), or the server went away: nothing to undo
        return me, created

    me, created = asyncio.run(run())
    _say(f"logged in to {escape(url)} as {escape(me['username'])}")
    _say(
        f"(token {escape(token_name)!r}, id {escape(created['id'])}, valid until "
        f"{escape(_when(created.get('expires_at')))} UTC, "
        f"stored in {escape(str(credentials.credentials_path()))})"
    )
    if credentials.token_source(server) == credentials.ENV_TOKEN:
        _say(f"[yellow]note:[/] {credentials.ENV_TOKEN} is set and is used instead of this login")


@main.command()
@server_option
@click.option(
    "--forget",
    is_flag=True,
    help="Remove the stored token even when the server cannot be reached to revoke it.",
)
def logout(server: str, forget: bool) -> None:
    """Revoke the CLI's stored token for a farm and remove it from the credentials file."""
    url = credentials.server_key(server)
    entry = _stored(server)
    if entry is None:
        _say(f"not logged in to {escape(url)} (no stored token)")
        return

    async def run() -> str:
        if not entry.get("token_id"):
            return "not revoked: it was stored without its id (renderfarm token list, then token revoke ID)"
        token = credentials.sendable(entry["token"])
        if token is None:
            return "not revoked: the stored token was malformed, so it cannot have worked"
        async with FarmClient(server, token) as c:
            try:
                await c.revoke_token(entry["token_id"])
            except ClientError as exc:
                if exc.status in (401, 404):
                    return "it no longer worked"
                if not forget:
                    _fail(
                        f"could not revoke the token at {url}: {exc}; it is still stored "
                        "(try again, or pass --forget to remove it without revoking it)"
                    )
                return (
                    f"NOT revoked ({exc}); revoke it later with renderfarm token revoke {entry['token_id']}"
                )
        return "token revoked"

    how = asyncio.run(run())
    try:
        credentials.forget(server)
    except credentials.CredentialsError as exc:
        _fail(str(exc))
    _say(f"logged out of {escape(url)} ({escape(how)})")


@main.command()
@server_option
@json_option
def whoami(server: str, as_json: bool) -> None:
    """Show who the CLI is logged in as: user, admin flag, projects and roles."""
    me = _call(server, lambda c: c.me())
    if as_json:
        _json(me)
        return
    admin = " (admin)" if me["is_admin"] else ""
    out.print(f"{escape(me['username'])}{admin} on {escape(credentials.server_key(server))}")
    for p in me["projects"]:
        out.print(f"  project {escape(p['name'])}: {escape(str(p['role']))}")
    if not me["projects"]:
        out.print("  (no projects)")
    source = credentials.token_source(server)
    if source:
        _say(f"token from {escape(source)}")


@main.command()
@server_option
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the current, then the new password from stdin's first two lines.",
)
def passwd(server: str, password_stdin: bool) -> None:
    """Change your own password. Every token of yours is revoked: log in again afterwards."""
    if password_stdin:
        current, new = _password_from_stdin(), _password_from_stdin()
    else:
        current = str(click.prompt("Current password", hide_input=True, err=True))
        new = _new_password(False)
    _call(server, lambda c: c.change_password(current, new))
    credentials.forget(server)
    _say(
        f"password changed; every token of yours is revoked: run `renderfarm login --server {escape(server)}`"
    )


# ------------------------------------------------------------------ users


@main.group()
def user() -> None:
    """Users (admins): create, list, disable, enable, set a password."""


@user.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="Make the user an admin of the whole farm.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input's first line.")
@server_option
def user_create(name: str, admin: bool, password_stdin: bool, server: str) -> None:
    """Create user NAME (asks for the password twice; at least 10 characters)."""
    password = _new_password(password_stdin)
    u = _call(server, lambda c: c.create_user(name, password, admin))
    _say(f"created user {escape(u['username'])}" + (" (admin)" if u["is_admin"] else ""))
    if not u["is_admin"]:
        _say(
            "add them to a project: "
            + escape(f"renderfarm project add-member PROJECT {u['username']} --role artist")
        )


@user.command("list")
@server_option
@json_option
def user_list(server: str, as_json: bool) -> None:
    """List every user, with their projects and roles."""
    users = _call(server, lambda c: c.users())
    if as_json:
        _json(users)
        return
    t = _table("User", "Admin", "State", "Projects", "Created (UTC)")
    for u in users:
        projects = ", ".join(f"{p['name']} ({p['role']})" for p in u["projects"]) or "-"
        _row(
            t,
            u["username"],
            "yes" if u["is_admin"] else "",
            "disabled" if u["disabled"] else "enabled",
            projects,
            _when(u["created_at"]),
        )
    out.print(t)


def _update_user(server: str, name: str, **fields: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``PATCH`` user ``name`` with ``fields``; returns (the caller as ``GET /api/me`` saw them
    before the change, the updated user). The caller is whoever the token in use belongs to
    (``RENDERFARM_TOKEN`` or the stored one), asked first since the change may revoke it."""

    async def go(c: FarmClient) -> tuple[dict[str, Any], dict[str, Any]]:
        me = await c.me()
        return me, await c.update_user(name, **fields)

    return _call(server, go)


def _self_note(server: str, me: dict[str, Any], user: dict[str, Any], what: str) -> None:
    """A note when the caller (``me``) changed their own account (``user``): their token is gone."""
    if me.get("id") and user.get("id"):
        same = me["id"] == user["id"]
    else:
        same = me.get("username") == user.get("username")
    if not same:
        return
    source = credentials.token_source(server)
    whose = f"the token in {source}" if source == credentials.ENV_TOKEN else "the CLI's token"
    _say(f"[yellow]note:[/] {what} your own account: {escape(whose)} was revoked too; log in again")


@user.command("disable")
@click.argument("name")
@server_option
def user_disable(name: str, server: str) -> None:
    """Disable user NAME: they cannot log in, and every token of theirs is revoked at once."""
    me, u = _update_user(server, name, disabled=True)
    _say(f"user {escape(u['username'])} disabled; their tokens are revoked")
    _self_note(server, me, u, "you disabled")


@user.command("enable")
@click.argument("name")
@server_option
def user_enable(name: str, server: str) -> None:
    """Enable user NAME again (their old tokens stay revoked: they log in again)."""
    u = _call(server, lambda c: c.update_user(name, disabled=False))
    _say(f"user {escape(u['username'])} enabled")


@user.command("set-password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input's first line.")
@server_option
def user_set_password(name: str, password_stdin: bool, server: str) -> None:
    """Set user NAME's password (asks twice); every token of theirs is revoked."""
    password = _new_password(password_stdin)
    me, u = _update_user(server, name, password=password)
    _say(f"password of {escape(u['username'])} set; their tokens are revoked")
    _self_note(server, me, u, "you set the password of")


# ------------------------------------------------------------------ projects


@main.group()
def project() -> None:
    """Projects and their members (manager, artist, viewer)."""


@project.command("create")
@click.argument("name")
@server_option
def project_create(name: str, server: str) -> None:
    """Create project NAME (admins)."""
    p = _call(server, lambda c: c.create_project(name))
    _say(f"created project {escape(p['name'])} (id {escape(p['id'])})")
    _say(escape(f"add members: renderfarm project add-member {p['name']} USER --role artist"))


@project.command("list")
@server_option
@json_option
def project_list(server: str, as_json: bool) -> None:
    """List your projects (an admin: every project), your role and the member count."""
    projects = _call(server, lambda c: c.projects())
    if as_json:
        _json(projects)
        return
    t = _table("Project", "Your role", "Members", "Id")
    for p in projects:
        _row(t, p["name"], p.get("role") or "-", len(p.get("members") or []), p["id"])
    out.print(t)


@project.command("show")
@click.argument("name")
@server_option
@json_option
def project_show(name: str, server: str, as_json: bool) -> None:
    """Show project NAME (or id) and its members."""
    p = _call(server, lambda c: c.project(name))
    if as_json:
        _json(p)
        return
    out.print(
        f"project {escape(p['name'])} (id {escape(p['id'])}); your role: {escape(str(p.get('role') or '-'))}"
    )
    t = _table("Member", "Role")
    for m in p.get("members") or []:
        _row(t, m["user"], m["role"])
    out.print(t if p.get("members") else "  (no members)")


@project.command("add-member")
@click.argument("project_name", metavar="PROJECT")
@click.argument("username", metavar="USER")
@click.option("--role", type=click.Choice(ROLES), default="artist", show_default=True)
@server_option
def project_add_member(project_name: str, username: str, role: str, server: str) -> None:
    """Add USER to PROJECT with a role, or change their role (admins and the project's managers)."""
    m = _call(server, lambda c: c.set_member(project_name, username, role))
    _say(f"{escape(m['user'])} is {escape(m['role'])} of project {escape(project_name)}")


@project.command("remove-member")
@click.argument("project_name", metavar="PROJECT")
@click.argument("username", metavar="USER")
@server_option
def project_remove_member(project_name: str, username: str, server: str) -> None:
    """Remove USER from PROJECT (admins and the project's managers)."""
    _call(server, lambda c: c.remove_member(project_name, username))
    _say(f"removed {escape(username)} from project {escape(project_name)}")


# ------------------------------------------------------------------ tokens


@main.group()
def token() -> None:
    """Personal API tokens (scripts, the Blender add-on) and agent tokens (admins)."""


@token.command("create")
@click.argument("name", required=False)
@click.option(
    "--days", type=click.IntRange(1, 365), default=None, help="Days a personal token lasts (default 90)."
)
@click.option(
    "--agent",
    "agent_name",
    default=None,
    metavar="AGENT_NAME",
    help="Create an agent token bound to this agent name instead (admins).",
)
@server_option
def token_create(name: str | None, days: int | None, agent_name: str | None, server: str) -> None:
    """Create a personal token NAME, or (--agent) an agent token; prints the token alone on stdout.

    The token is shown only this once, e.g. TOKEN=$(renderfarm token create ci).
    """
    url = credentials.server_key(server)
    if agent_name is not None:
        if days is not None:
            _fail("--days is for personal tokens; an agent token lasts until revoked")
        t = _call(server, lambda c: c.create_agent_token(agent_name, name or ""))
        click.echo(t["token"])
        _say(
            f"agent token for agent {escape(agent_name)} (id {escape(t['id'])}), shown only once; "
            "start the agent with "
            + escape(f"RENDERFARM_AGENT_TOKEN=<token> renderfarm agent --server {url}")
        )
        return
    if not name:
        _fail("give the token a NAME (or --agent AGENT_NAME for an agent token)")
    t = _call(server, lambda c: c.create_token(name, days))
    click.echo(t["token"])
    _say(
        f"personal token {escape(name)!r} (id {escape(t['id'])}) valid until "
        f"{escape(_when(t.get('expires_at')))} UTC, shown only once; use it as "
        + escape(f"RENDERFARM_TOKEN=<token> renderfarm ... --server {url}")
    )


def _state(t: dict[str, Any]) -> str:
    from datetime import UTC, datetime

    if t.get("revoked_at"):
        return "revoked"
    exp = t.get("expires_at")
    if exp:
        try:
            when = datetime.fromisoformat(exp.replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            if when <= datetime.now(UTC):
                return "expired"
        except ValueError:
            pass
    return "active"


@token.command("list")
@click.option("--agent", is_flag=True, help="Agent tokens instead (admins).")
@click.option("--all", "all_users", is_flag=True, help="Every user's personal tokens (admins).")
@server_option
@json_option
def token_list(agent: bool, all_users: bool, server: str, as_json: bool) -> None:
    """List your personal tokens (never the tokens themselves); * marks the CLI's own."""
    tokens = _call(server, lambda c: c.tokens("agent" if agent else None, all_users))
    if as_json:
        _json(tokens)
        return
    entry = _stored(server) or {}
    t = _table("", "Id", "Name", "Agent" if agent else "User", "Expires", "Last used", "State")
    for k in tokens:
        _row(
            t,
            "*" if k["id"] == entry.get("token_id") else "",
            k["id"],
            k["name"],
            k.get("agent_name") if agent else k.get("user"),
            _when(k.get("expires_at"))[:10],
            _when(k.get("last_used_at"))[:10],
            _state(k),
        )
    out.print(t)


@token.command("revoke")
@click.argument("token_id", metavar="ID")
@server_option
def token_revoke(token_id: str, server: str) -> None:
    """Revoke token ID (yours; an admin: anyone's or an agent's). It stops working at once."""
    _call(server, lambda c: c.revoke_token(token_id))
    _say(f"token {escape(token_id)} revoked")
    entry = _stored(server)
    if entry and entry.get("token_id") == token_id:
        try:
            credentials.forget(server)
        except credentials.CredentialsError as exc:
            _fail(str(exc))
        _say("that was the CLI's own token for this server: it is removed; log in again")


# ------------------------------------------------------------------ audit


@main.group(invoke_without_command=True)
@click.option("--actor", default=None, help="User or agent name.")
@click.option("--action", default=None, help="e.g. auth.login, jobs.cancel_job.")
@click.option("--outcome", type=click.Choice(OUTCOMES), default=None)
@click.option("--target", default=None, help="e.g. job_id=...")
@click.option("--project-id", default=None, help="A project's id.")
@click.option("--since", default=None, help="ISO 8601 time, e.g. 2026-01-31T12:00:00Z (inclusive).")
@click.option("--until", default=None, help="ISO 8601 time (exclusive).")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--before", type=click.IntRange(1), default=None, help="Entries below this seq (older).")
@server_option
@json_option
@click.pass_context
def audit(ctx: click.Context, server: str, as_json: bool, **filters: Any) -> None:
    """The audit log (admins): who did what, newest first. `renderfarm audit verify` checks its chain."""
    if ctx.invoked_subcommand is not None:
        return
    page = _call(server, lambda c: c.audit(**filters))
    if as_json:
        _json(page)
        return
    t = _table("Seq", "Time (UTC)", "Actor", "Action", "Target", "Outcome", "Status", "IP")
    for e in page["entries"]:
        _row(
            t,
            e["seq"],
            _when(e["at"]),
            e["actor"],
            e["action"],
            e["target"],
            e["outcome"],
            e["status"],
            e["ip"],
        )
    out.print(t if page["entries"] else "(no entries)")
    if page.get("next_before"):
        _say(escape(f"older entries: renderfarm audit --before {page['next_before']}"))


def _server_or_parent(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    if value is None:
        parent = ctx.parent.params.get("server") if ctx.parent else None
        return str(parent or DEFAULT_SERVER)
    return _check_server(ctx, param, value)


@audit.command("verify")
@click.option(
    "--server", default=None, callback=_server_or_parent, help="Farm URL (default: audit's --server)."
)
@json_option
def audit_verify(server: str, as_json: bool) -> None:
    """Check the audit log's hash chain; exits 1 naming the first broken entry."""
    r = _call(server, lambda c: c.audit_verify())
    if as_json:
        _json(r)
    if r["ok"]:
        if not as_json:
            out.print(f"audit log intact: {r['checked']} entries checked")
        return
    _fail(
        f"audit log broken at seq {r['first_broken_seq']}: {r['reason']} ({r['checked']} entries checked)",
        code=1,
    )
