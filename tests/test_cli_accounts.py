"""The CLI's accounts: login, credentials file, users, projects, tokens, audit, and `up`'s own login,
against a live in-process farm (click's CliRunner in a thread, the farm on the test's loop)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select, update

from cli import credentials
from cli.client import ClientError, FarmClient
from cli.farm import free_port
from cli.main import _log_cli_in, main
from server.persistence.tables import ApiToken, AuditEntry, Model, User
from tests.conftest import Farm

pytestmark = pytest.mark.agents(0)
RENDERFARM = str(Path(sys.executable).with_name("renderfarm"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XDG_CONFIG_HOME of the CLI (credentials in ``home/renderfarm``), with no RENDERFARM_TOKEN."""
    monkeypatch.delenv(credentials.ENV_TOKEN, raising=False)
    monkeypatch.delenv("RENDERFARM_SERVER", raising=False)
    config = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    return config


async def cli(*args: str, input: str | None = None, env: dict[str, Any] | None = None) -> Result:
    """``renderfarm ARGS`` in a thread (the command runs its own event loop)."""
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, main, list(args), input=input, env=env, catch_exceptions=False
    )


def flat(text: str) -> str:
    """Text with rich's line wrapping undone (every run of whitespace as one space)."""
    return " ".join(text.split())


def admin_password(farm: Farm) -> str:
    return (farm.settings.data_dir / "secrets" / "initial-admin-password").read_text().strip()


async def login(farm: Farm, username: str, password: str, config: Path | None = None) -> Result:
    env = {"XDG_CONFIG_HOME": str(config)} if config else None
    res = await cli(
        "login",
        "--server",
        farm.url,
        "--username",
        username,
        "--password-stdin",
        input=password + "\n",
        env=env,
    )
    assert res.exit_code == 0, res.output
    return res


def stored(config: Path, url: str) -> dict[str, Any]:
    data = json.loads((config / "renderfarm" / "credentials.json").read_text())
    return data["servers"][url]


async def works(url: str, token: str) -> bool:
    """Whether ``token`` is accepted by ``GET /api/me``."""
    async with FarmClient(url, token) as c:
        try:
            await c.me()
        except ClientError as exc:
            assert exc.status == 401, exc
            return False
    return True


async def test_login_stores_a_private_token_ends_the_session_and_whoami(farm: Farm, home: Path) -> None:
    res = await login(farm, "admin", admin_password(farm))
    assert f"logged in to {farm.url} as admin" in flat(res.stderr)
    assert res.stdout == ""
    path = home / "renderfarm" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []  # no temp file left
    entry = stored(home, farm.url)
    assert entry["username"] == "admin" and entry["token"].startswith("rfp_") and entry["token_id"]
    assert await works(farm.url, entry["token"])

    async with farm.ctx.db.session() as s:
        row = await s.get(ApiToken, entry["token_id"])
        assert row is not None and row.kind == "personal"
        assert row.name == f"renderfarm CLI on {socket.gethostname()}"
        refresh = (await s.scalars(select(ApiToken).where(ApiToken.kind == "refresh"))).all()
    assert refresh and all(r.revoked_at is not None for r in refresh)  # the login session was ended

    res = await cli("whoami", "--server", farm.url)
    assert res.exit_code == 0, res.output
    assert f"admin (admin) on {farm.url}" in res.stdout and "project default: manager" in res.stdout
    res = await cli("whoami", "--server", farm.url + "/", "--json")  # a trailing slash: the same server
    assert res.exit_code == 0, res.output
    me = json.loads(res.stdout)
    assert me["username"] == "admin" and me["is_admin"] is True

    # logging in again replaces the stored token and revokes the old one
    await login(farm, "admin", admin_password(farm))
    again = stored(home, farm.url)
    assert again["token"] != entry["token"]
    assert await works(farm.url, again["token"]) and not await works(farm.url, entry["token"])


async def test_wrong_password_exits_2_with_the_servers_message_then_throttled(farm: Farm, home: Path) -> None:
    for _ in range(farm.settings.login_max_failures):
        res = await cli(
            "login", "--server", farm.url, "-u", "admin", "--password-stdin", input="not-the-password\n"
        )
        assert res.exit_code == 2
        assert "wrong user name or password" in flat(res.stderr)
    assert not (home / "renderfarm" / "credentials.json").exists()
    res = await cli(
        "login", "--server", farm.url, "-u", "admin", "--password-stdin", input=admin_password(farm)
    )
    assert res.exit_code == 2
    assert "too many failed logins" in flat(res.stderr) and "try again in" in flat(res.stderr)

    res = await cli("login", "--server", farm.url, "--password-stdin", input="x\n")
    assert res.exit_code == 2 and "--password-stdin needs --username" in flat(res.stderr)


async def test_password_prompt_is_hidden_and_used(farm: Farm, home: Path) -> None:
    res = await cli("login", "--server", farm.url, input=f"admin\n{admin_password(farm)}\n")
    assert res.exit_code == 0, res.output
    assert admin_password(farm) not in res.output  # the password is not echoed
    assert stored(home, farm.url)["username"] == "admin"


async def test_users_disable_enable_set_password(farm: Farm, home: Path, tmp_path: Path) -> None:
    await login(farm, "admin", admin_password(farm))
    res = await cli(
        "user", "create", "bob", "--server", farm.url, "--password-stdin", input="bob-password-1\n"
    )
    assert res.exit_code == 0, res.output
    assert "created user bob" in flat(res.stderr)
    res = await cli("user", "create", "eve", "--server", farm.url, "--password-stdin", input="short\n")
    assert res.exit_code == 2 and "10" in flat(res.stderr)  # the server's rule, in its words
    res = await cli(
        "user", "create", "bob", "--server", farm.url, "--password-stdin", input="bob-password-1\n"
    )
    assert res.exit_code == 2  # taken
    # no --password-stdin: asked twice
    res = await cli("user", "create", "carol", "--admin", "--server", farm.url, input="carol-pass-1\n" * 2)
    assert res.exit_code == 0, res.output
    assert "created user carol (admin)" in flat(res.stderr)

    res = await cli("user", "list", "--server", farm.url, "--json")
    assert res.exit_code == 0, res.output
    users = {u["username"]: u for u in json.loads(res.stdout)}
    assert set(users) == {"admin", "bob", "carol"}
    assert users["carol"]["is_admin"] and not users["bob"]["is_admin"] and not users["bob"]["disabled"]
    res = await cli("user", "list", "--server", farm.url)
    assert res.exit_code == 0 and "bob" in res.stdout and "carol" in res.stdout

    res = await cli("project", "add-member", "default", "bob", "--role", "artist", "--server", farm.url)
    assert res.exit_code == 0, res.output
    bob_home = tmp_path / "bob-config"
    await login(farm, "bob", "bob-password-1", bob_home)
    bob = {"XDG_CONFIG_HOME": str(bob_home)}
    res = await cli("whoami", "--server", farm.url, env=bob)
    assert res.exit_code == 0 and "bob on" in res.stdout and "project default: artist" in res.stdout
    res = await cli("user", "list", "--server", farm.url, env=bob)  # not an admin
    assert res.exit_code == 2 and "not logged in" not in res.stderr

    res = await cli("user", "disable", "bob", "--server", farm.url)
    assert res.exit_code == 0, res.output
    res = await cli("whoami", "--server", farm.url, env=bob)
    assert res.exit_code == 2
    assert (
        f"not logged in to {farm.url} (or the token expired/was revoked): "
        f"run `renderfarm login --server {farm.url}`"
    ) in flat(res.stderr)
    res = await cli(
        "login", "--server", farm.url, "-u", "bob", "--password-stdin", input="bob-password-1\n", env=bob
    )
    assert res.exit_code == 2  # a disabled user cannot log in

    res = await cli("user", "enable", "bob", "--server", farm.url)
    assert res.exit_code == 0, res.output
    await login(farm, "bob", "bob-password-1", bob_home)
    bob_token = stored(bob_home, farm.url)["token"]
    res = await cli(
        "user", "set-password", "bob", "--server", farm.url, "--password-stdin", input="bob-password-2\n"
    )
    assert res.exit_code == 0, res.output
    assert not await works(farm.url, bob_token)  # a new password revokes every token of theirs
    await login(farm, "bob", "bob-password-2", bob_home)
    res = await cli("user", "disable", "nobody", "--server", farm.url)
    assert res.exit_code == 2
    # bob changes his own password: a wrong current one is refused, then every token of his is revoked
    bob_env = {"XDG_CONFIG_HOME": str(bob_home)}
    bob_token = stored(bob_home, farm.url)["token"]
    res = await cli(
        "passwd",
        "--server",
        farm.url,
        "--password-stdin",
        input="wrong-password\nbob-password-3\n",
        env=bob_env,
    )
    assert res.exit_code == 2 and "current password is wrong" in flat(res.stderr)
    assert await works(farm.url, bob_token)
    res = await cli(
        "passwd",
        "--server",
        farm.url,
        "--password-stdin",
        input="bob-password-2\nbob-password-3\n",
        env=bob_env,
    )
    assert res.exit_code == 0, res.output
    assert not await works(farm.url, bob_token)
    assert not (bob_home / "renderfarm" / "credentials.json").read_text().count(bob_token)
    await login(farm, "bob", "bob-password-3", bob_home)


async def test_projects_and_members(farm: Farm, home: Path) -> None:
    await login(farm, "admin", admin_password(farm))
    res = await cli(
        "user", "create", "dan", "--server", farm.url, "--password-stdin", input="dan-password-1\n"
    )
    assert res.exit_code == 0, res.output
    res = await cli("project", "create", "film", "--server", farm.url)
    assert res.exit_code == 0 and "created project film" in flat(res.stderr)
    res = await cli("project", "create", "film", "--server", farm.url)
    assert res.exit_code == 2  # taken
    res = await cli("project", "list", "--server", farm.url)
    assert res.exit_code == 0 and "film" in res.stdout and "default" in res.stdout

    res = await cli("project", "add-member", "film", "dan", "--role", "viewer", "--server", farm.url)
    assert res.exit_code == 0 and "dan is viewer of project film" in flat(res.stderr)
    res = await cli("project", "show", "film", "--server", farm.url, "--json")
    members = {m["user"]: m["role"] for m in json.loads(res.stdout)["members"]}
    assert members == {"dan": "viewer"}
    res = await cli("project", "show", "film", "--server", farm.url)
    assert res.exit_code == 0 and "dan" in res.stdout and "viewer" in res.stdout
    res = await cli("project", "add-member", "film", "dan", "--role", "manager", "--server", farm.url)
    assert res.exit_code == 0
    res = await cli("project", "show", "film", "--server", farm.url, "--json")
    assert json.loads(res.stdout)["members"][0]["role"] == "manager"

    res = await cli("project", "add-member", "film", "dan", "--role", "boss", "--server", farm.url)
    assert res.exit_code == 2  # not a role (click refuses it)
    res = await cli("project", "add-member", "film", "ghost", "--server", farm.url)
    assert res.exit_code == 2 and "ghost" in flat(res.stderr)
    res = await cli("project", "remove-member", "film", "dan", "--server", farm.url)
    assert res.exit_code == 0, res.output
    res = await cli("project", "show", "film", "--server", farm.url, "--json")
    assert json.loads(res.stdout)["members"] == []
    res = await cli("project", "show", "nope", "--server", farm.url)
    assert res.exit_code == 2


async def test_token_create_prints_only_the_token(farm: Farm, home: Path, tmp_path: Path) -> None:
    await login(farm, "admin", admin_password(farm))
    res = await cli("token", "create", "ci", "--days", "7", "--server", farm.url)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rfp_") and res.stdout == lines[0] + "\n"
    ci = lines[0]
    assert "shown only once" in flat(res.stderr) and ci not in res.stderr
    assert await works(farm.url, ci)

    # RENDERFARM_TOKEN wins over the (absent) stored token
    res = await cli(
        "whoami",
        "--server",
        farm.url,
        env={"XDG_CONFIG_HOME": str(tmp_path / "empty"), "RENDERFARM_TOKEN": ci},
    )
    assert res.exit_code == 0 and "admin (admin)" in res.stdout

    res = await cli("token", "list", "--server", farm.url, "--json")
    by_name = {t["name"]: t for t in json.loads(res.stdout)}
    assert "ci" in by_name and by_name["ci"]["revoked_at"] is None
    res = await cli("token", "list", "--server", farm.url)
    assert res.exit_code == 0 and "ci" in res.stdout and "active" in res.stdout and "*" in res.stdout
    res = await cli("token", "revoke", by_name["ci"]["id"], "--server", farm.url)
    assert res.exit_code == 0, res.output
    assert not await works(farm.url, ci)
    assert await works(farm.url, stored(home, farm.url)["token"])  # the CLI's own token is untouched

    res = await cli("token", "create", "--agent", "render-01", "--server", farm.url)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("rfa_") and len(res.stdout.splitlines()) == 1
    assert "renderfarm agent" in flat(res.stderr)
    res = await cli("token", "list", "--agent", "--server", farm.url, "--json")
    assert [t["agent_name"] for t in json.loads(res.stdout)] == ["render-01"]
    res = await cli("token", "create", "--agent", "render-01", "--days", "3", "--server", farm.url)
    assert res.exit_code == 2
    res = await cli("token", "create", "--server", farm.url)
    assert res.exit_code == 2 and "NAME" in res.stderr

    # a non-admin may not make agent tokens
    res = await cli(
        "user", "create", "fay", "--server", farm.url, "--password-stdin", input="fay-password-1\n"
    )
    assert res.exit_code == 0
    fay_home = tmp_path / "fay"
    await login(farm, "fay", "fay-password-1", fay_home)
    res = await cli(
        "token", "create", "--agent", "sneaky", "--server", farm.url, env={"XDG_CONFIG_HOME": str(fay_home)}
    )
    assert res.exit_code == 2 and res.stdout == ""
    res = await cli("token", "list", "--agent", "--server", farm.url, "--json")
    assert [t["agent_name"] for t in json.loads(res.stdout)] == ["render-01"]

    # revoking the CLI's own token forgets it
    own = stored(home, farm.url)
    res = await cli("token", "revoke", own["token_id"], "--server", farm.url)
    assert res.exit_code == 0 and "log in again" in flat(res.stderr)
    assert farm.url not in json.loads((home / "renderfarm" / "credentials.json").read_text())["servers"]


async def test_logout_revokes_the_token(farm: Farm, home: Path) -> None:
    await login(farm, "admin", admin_password(farm))
    token = stored(home, farm.url)["token"]
    res = await cli("logout", "--server", farm.url)
    assert res.exit_code == 0, res.output
    assert f"logged out of {farm.url} (token revoked)" in flat(res.stderr)
    assert not await works(farm.url, token)
    assert json.loads((home / "renderfarm" / "credentials.json").read_text())["servers"] == {}
    res = await cli("logout", "--server", farm.url)
    assert res.exit_code == 0 and "not logged in" in flat(res.stderr)
    res = await cli("whoami", "--server", farm.url)
    assert res.exit_code == 2 and "renderfarm login --server" in flat(res.stderr)


async def test_logout_from_an_unreachable_server_keeps_the_token_unless_forget(home: Path) -> None:
    url = "http://127.0.0.1:9"
    credentials.store(url, "rfp_x", "admin", "tok1")
    res = await cli("logout", "--server", url)
    assert res.exit_code == 2 and "--forget" in flat(res.stderr)
    assert credentials.stored(url) is not None
    res = await cli("logout", "--server", url, "--forget")
    assert res.exit_code == 0 and "NOT revoked" in flat(res.stderr)
    assert credentials.stored(url) is None


async def test_client_commands_without_a_token_exit_2_with_the_login_hint(
    farm: Farm, home: Path, tmp_path: Path
) -> None:
    blend = tmp_path / "scene.blend"
    blend.write_bytes(b"BLENDER-v300" + b"\0" * 64)
    hint = (
        f"not logged in to {farm.url} (or the token expired/was revoked): "
        f"run `renderfarm login --server {farm.url}`"
    )
    res = await cli("submit", str(blend), "--frames", "1", "--server", farm.url)
    assert res.exit_code == 2 and hint in flat(res.stderr), res.output
    for args in (
        ["status", "j1"],
        ["cancel", "j1"],
        ["priority", "j1", "5"],
        ["download", "j1", str(tmp_path)],
    ):
        res = await cli(*args, "--server", farm.url)
        assert res.exit_code == 2 and hint in flat(res.stderr), (args, res.output)
    res = await cli("status", "j1", "--server", farm.url, env={"RENDERFARM_TOKEN": "rfp_not-a-token"})
    assert res.exit_code == 2 and "RENDERFARM_TOKEN" in flat(res.stderr)

    # with the stored token the same command reaches the farm (and gets the job's own 404)
    await login(farm, "admin", admin_password(farm))
    res = await cli("status", "j1", "--server", farm.url)
    assert res.exit_code == 2 and "not logged in" not in res.stderr and "not found" in flat(res.stderr)


async def test_audit_list_and_verify(farm: Farm, home: Path) -> None:
    res = await cli(
        "login", "--server", farm.url, "-u", "admin", "--password-stdin", input="wrong-password\n"
    )
    assert res.exit_code == 2
    await login(farm, "admin", admin_password(farm))
    res = await cli("audit", "--action", "auth.login", "--server", farm.url, "--json")
    assert res.exit_code == 0, res.output
    outcomes = [e["outcome"] for e in json.loads(res.stdout)["entries"]]
    assert outcomes == ["success", "failure"]  # newest first
    res = await cli("audit", "--action", "auth.login", "--outcome", "failure", "--server", farm.url)
    assert res.exit_code == 0 and "auth.login" in res.stdout and "failure" in res.stdout
    assert "success" not in res.stdout
    res = await cli("audit", "--limit", "1", "--server", farm.url)
    assert res.exit_code == 0 and "--before" in flat(res.stderr)
    res = await cli("audit", "--since", "yesterday", "--server", farm.url)
    assert res.exit_code == 2 and "since" in res.stderr

    # a user name tried at login is whatever anyone typed: the table shows escapes, never raw ones
    async with FarmClient(farm.url) as anonymous:
        with pytest.raises(ClientError):
            await anonymous.login("\x1b[2J\x1b]0;PWNED\x07evil\x9b31m", "x" * 12)
    res = await cli("audit", "--action", "auth.login", "--limit", "1", "--server", farm.url)
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.stdout and "\x9b" not in res.stdout and "\x07" not in res.stdout
    assert "\\x1b[2J" in res.stdout.replace("\n", "").replace(" ", ""), res.stdout

    res = await cli("audit", "verify", "--server", farm.url)
    assert res.exit_code == 0, res.output
    assert "audit log intact" in res.stdout
    async with farm.ctx.db.session() as s:  # tamper with the first row behind the log's back
        await s.execute(update(AuditEntry).where(AuditEntry.seq == 1).values(actor="mallory"))
        await s.commit()
    res = await cli("audit", "--server", farm.url, "verify")  # the group's --server is used
    assert res.exit_code == 1, res.output
    assert "broken at seq 1" in flat(res.stderr)


async def test_up_logs_the_cli_in_and_keeps_a_working_token(farm: Farm, home: Path) -> None:
    await _log_cli_in(farm)
    first = stored(home, farm.url)
    assert first["username"] == "admin" and await works(farm.url, first["token"])
    async with farm.ctx.db.session() as s:
        row = await s.get(ApiToken, first["token_id"])
        admin = await s.scalar(select(User).where(User.username == "admin"))
        assert row is not None and admin is not None and row.user_id == admin.id
    await _log_cli_in(farm)
    assert stored(home, farm.url) == first  # a working token is kept
    async with FarmClient(farm.url, first["token"]) as c:
        await c.revoke_token(first["token_id"])
    await _log_cli_in(farm)
    second = stored(home, farm.url)
    assert second["token"] != first["token"] and await works(farm.url, second["token"])


def test_credentials_file_others_can_read_is_fixed_and_env_wins(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    credentials.store("http://farm:3000/", "rfp_a", "ann", "t1")
    path = credentials.credentials_path()
    assert path == home / "renderfarm" / "credentials.json"
    assert credentials.token_for("http://farm:3000") == "rfp_a"
    os.chmod(path, 0o644)
    assert credentials.token_for("http://farm:3000") == "rfp_a"
    assert "readable by other users" in capsys.readouterr().err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    monkeypatch.setenv(credentials.ENV_TOKEN, "rfp_env")
    assert credentials.token_for("http://farm:3000") == "rfp_env"
    assert credentials.token_for("http://other:3000") == "rfp_env"
    monkeypatch.delenv(credentials.ENV_TOKEN)
    assert credentials.token_for("http://other:3000") is None
    assert credentials.forget("http://farm:3000")["token"] == "rfp_a"
    assert credentials.forget("http://farm:3000") is None
    path.write_text("{not json")
    with pytest.raises(credentials.CredentialsError, match="not valid JSON"):
        credentials.token_for("http://farm:3000")


def test_renderfarm_up_logs_the_cli_in_for_submit(tmp_path: Path) -> None:
    """`renderfarm up` then a client command with no login step (the README's flow), in processes."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RENDERFARM_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    proc = subprocess.Popen(
        [RENDERFARM, "up", "--agents", "0", "--port", str(port), "--data-dir", str(tmp_path / "farm")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        cred = tmp_path / "config" / "renderfarm" / "credentials.json"
        while not (cred.exists() and url in cred.read_text()):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "renderfarm up never stored a token"
            time.sleep(0.2)
        with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
            assert r.status == 200
        res = subprocess.run(
            [RENDERFARM, "whoami", "--server", url], env=env, capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("admin (admin) on")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out = proc.communicate(timeout=30)[1]
        finally:
            proc.kill()
    assert "the CLI is logged in to" in flat(out)
    # not the default server: say how client commands reach it
    assert f"(use --server {url} or export RENDERFARM_SERVER={url})" in flat(out)


async def test_submit_project_option_and_the_choice_when_in_several_projects(
    farm: Farm, home: Path, sample_blend: Path
) -> None:
    await login(farm, "admin", admin_password(farm))
    res = await cli(
        "user", "create", "gus", "--server", farm.url, "--password-stdin", input="gus-password-1\n"
    )
    assert res.exit_code == 0, res.output
    res = await cli("project", "create", "shots", "--server", farm.url)
    assert res.exit_code == 0, res.output
    for name in ("default", "shots"):
        res = await cli("project", "add-member", name, "gus", "--role", "artist", "--server", farm.url)
        assert res.exit_code == 0, res.output
    gus_home = home.parent / "gus"
    await login(farm, "gus", "gus-password-1", gus_home)
    gus = {"XDG_CONFIG_HOME": str(gus_home)}

    res = await cli("submit", str(sample_blend), "--frames", "1", "--server", farm.url, env=gus)
    assert res.exit_code == 2, res.output
    assert "you belong to several projects (default, shots): choose one with --project NAME" in flat(
        res.stderr
    )
    assert res.stdout == ""
    async with farm.ctx.db.session() as s:
        assert (await s.scalars(select(Model))).all() == []  # nothing was kept

    res = await cli(
        "submit", str(sample_blend), "--project", "shots", "--frames", "1", "--server", farm.url, env=gus
    )
    assert res.exit_code == 0, res.output
    job_id = res.stdout.strip()
    shots = await farm.client.project("shots")
    job = await farm.client.job(job_id)
    assert job["project_id"] == shots["id"] and job["owner"] == "gus"
    async with farm.ctx.db.session() as s:
        models = (await s.scalars(select(Model))).all()
    assert [m.project_id for m in models] == [shots["id"]]

    res = await cli(
        "submit", str(sample_blend), "--project", "nope", "--frames", "1", "--server", farm.url, env=gus
    )
    assert res.exit_code == 2 and "nope" in flat(res.stderr) and "field: project" in flat(res.stderr)
    # the admin belongs to one project (default): no --project needed
    res = await cli("submit", str(sample_blend), "--frames", "1", "--server", farm.url)
    assert res.exit_code == 0, res.output
    default = await farm.client.project("default")
    assert (await farm.client.job(res.stdout.strip()))["project_id"] == default["id"]


@pytest.mark.parametrize("bad", ["rfp_abc\ndef", "rfp_abc\tdef", "rfp_abc def", "rfp_abc\x1bdef"])
async def test_a_token_with_a_control_character_or_space_exits_2_naming_its_source(
    farm: Farm, home: Path, bad: str
) -> None:
    res = await cli("whoami", "--server", farm.url, env={credentials.ENV_TOKEN: bad})
    assert res.exit_code == 2, res.output  # and no traceback (catch_exceptions=False would raise it)
    err = flat(res.stderr)
    assert "RENDERFARM_TOKEN holds" in err and "position 8" in err and "set RENDERFARM_TOKEN" in err
    assert bad not in res.stderr  # the token itself is not shown

    await login(farm, "admin", admin_password(farm))
    good = stored(home, farm.url)["token"]
    # surrounding whitespace (a pasted token's newline) is removed, from either source
    res = await cli("whoami", "--server", farm.url, env={credentials.ENV_TOKEN: f" {good}\r\n"})
    assert res.exit_code == 0 and "admin (admin)" in res.stdout, res.output
    credentials.store(farm.url, good + "\n", "admin", stored(home, farm.url)["token_id"])
    res = await cli("whoami", "--server", farm.url)
    assert res.exit_code == 0 and "admin (admin)" in res.stdout, res.output

    path = home / "renderfarm" / "credentials.json"
    credentials.store(farm.url, bad, "admin", "t-bad")
    res = await cli("whoami", "--server", farm.url)
    assert res.exit_code == 2, res.output
    err = flat(res.stderr)
    # (rich folds the long path: compare without the line breaks it put inside it)
    assert f"the token stored for {farm.url} in {path} holds" in res.stderr.replace("\n", "")
    assert f"renderfarm login --server {farm.url}" in err
    res = await cli("status", "j1", "--server", farm.url)
    assert res.exit_code == 2 and f"the token stored for {farm.url}" in flat(res.stderr)
    # logout and `up`'s own login cope with the bad stored token instead of crashing
    res = await cli("logout", "--server", farm.url)
    assert res.exit_code == 0 and "malformed" in flat(res.stderr), res.output
    assert credentials.stored(farm.url) is None
    credentials.store(farm.url, bad, "admin", "t-bad")
    await _log_cli_in(farm)
    assert await works(farm.url, stored(home, farm.url)["token"])


def test_token_for_strips_and_refuses_blank_tokens(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(credentials.ENV_TOKEN, "  rfp_env\n")
    assert credentials.token_for("http://farm:3000") == "rfp_env"
    monkeypatch.setenv(credentials.ENV_TOKEN, " \n")
    with pytest.raises(credentials.CredentialsError, match="RENDERFARM_TOKEN is blank"):
        credentials.token_for("http://farm:3000")
    monkeypatch.setenv(credentials.ENV_TOKEN, "rfp_\u00e9x")
    with pytest.raises(credentials.CredentialsError, match="non-ASCII"):
        credentials.token_for("http://farm:3000")
    monkeypatch.delenv(credentials.ENV_TOKEN)
    credentials.store("http://farm:3000", "rfp_a\tb", "ann", "t1")
    with pytest.raises(
        credentials.CredentialsError, match=r"the token stored for http://farm:3000 in .*'\\t'"
    ):
        credentials.token_for("http://farm:3000")
    assert credentials.sendable("rfp_a\tb") is None and credentials.sendable(" rfp_a\n") == "rfp_a"


async def test_self_note_is_about_the_caller_not_the_stored_login(
    farm: Farm, home: Path, tmp_path: Path
) -> None:
    await login(farm, "admin", admin_password(farm))  # the stored credentials are admin's
    res = await cli("user", "create", "carol", "--admin", "--server", farm.url, input="carol-pass-1\n" * 2)
    assert res.exit_code == 0, res.output
    await login(farm, "carol", "carol-pass-1", tmp_path / "carol")
    carol = {credentials.ENV_TOKEN: stored(tmp_path / "carol", farm.url)["token"]}

    res = await cli("user", "disable", "admin", "--server", farm.url, env=carol)
    assert res.exit_code == 0, res.output
    assert "user admin disabled" in flat(res.stderr) and "your own account" not in res.stderr
    res = await cli("user", "enable", "admin", "--server", farm.url, env=carol)
    assert res.exit_code == 0, res.output

    # carol, through RENDERFARM_TOKEN, changes her own account: the note names that token
    res = await cli(
        "user", "set-password", "carol", "--server", farm.url, "--password-stdin",
        input="carol-pass-2\n", env=carol,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (
        "note: you set the password of your own account: the token in RENDERFARM_TOKEN was revoked too"
        in flat(res.stderr)
    )
    # the stored login's own user, through the stored token
    await login(farm, "admin", admin_password(farm))
    res = await cli(
        "user", "set-password", "admin", "--server", farm.url, "--password-stdin", input="admin-pass-22\n"
    )
    assert res.exit_code == 0, res.output
    assert "your own account: the CLI's token was revoked too" in flat(res.stderr)


async def test_up_says_how_to_reach_a_farm_that_is_not_the_default_server(
    farm: Farm, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hint = f"(use --server {farm.url} or export RENDERFARM_SERVER={farm.url})"
    await _log_cli_in(farm)  # no RENDERFARM_SERVER: the default is http://127.0.0.1:3000
    err = flat(capsys.readouterr().err)
    assert f"the CLI is logged in to {farm.url} as admin" in err and hint in err
    await _log_cli_in(farm)  # the kept token: the same hint
    assert hint in flat(capsys.readouterr().err)
    monkeypatch.setenv("RENDERFARM_SERVER", farm.url + "/")
    await _log_cli_in(farm)
    err = flat(capsys.readouterr().err)
    assert f"the CLI is logged in to {farm.url} as admin" in err and "RENDERFARM_SERVER" not in err
