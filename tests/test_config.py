"""Settings: flags over RENDERFARM_* variables over the TOML file over defaults; bad input named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.config import Settings, load_settings, redact_url


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "farm.toml"
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    s = load_settings(env={}, data_dir=tmp_path / "d")
    assert s.data_dir == (tmp_path / "d").resolve()
    assert s.database_url == f"sqlite+aiosqlite:///{s.data_dir / 'renderfarm.db'}"
    assert s.broker_url == "memory://" and s.cache_url == "memory://"
    assert s.storage_url == (s.data_dir / "storage").as_uri()
    assert s.lease_s == 30.0 and s.dispatch_window == 0 and s.loopback_only is False


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    cfg = _toml(
        tmp_path,
        f"""
data_dir = "{tmp_path / "from-file"}"
lease_s = 10
heartbeat_s = 2.5
dispatch_window = 5
broker_url = "amqp://file@rabbit/"
cache_url = "redis://file:6379/0"
loopback_only = true
""",
    )
    env = {
        "RENDERFARM_LEASE_S": "20",
        "RENDERFARM_HEARTBEAT_S": "3",
        "RENDERFARM_BROKER_URL": "amqp://env@rabbit/",
        "RENDERFARM_DISPATCH_WINDOW": "",  # empty means unset
        "RENDERFARM_SERVER": "http://elsewhere:3000",  # a client setting, not the server's
    }
    s = load_settings(cfg, env, lease_s=40.0, broker_url=None, storage_url="s3://bucket")
    assert s.lease_s == 40.0  # flag
    assert s.broker_url == "amqp://env@rabbit/"  # a None flag is no flag: environment
    assert s.heartbeat_s == 3.0  # environment over file
    assert s.dispatch_window == 5 and isinstance(s.dispatch_window, int)  # file
    assert s.cache_url == "redis://file:6379/0" and s.loopback_only is True
    assert s.storage_url == "s3://bucket"
    assert s.data_dir == (tmp_path / "from-file").resolve()
    assert s.task_timeout_s == 3600.0  # default


def test_config_file_from_the_environment(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, 'reconcile_s = 4\ndata_dir = "/tmp/x"\n')
    s = load_settings(env={"RENDERFARM_CONFIG": str(cfg)})
    assert s.reconcile_s == 4.0
    other = tmp_path / "empty.toml"
    other.write_text("")
    s = load_settings(other, {"RENDERFARM_CONFIG": str(cfg)}, data_dir=tmp_path)
    assert s.reconcile_s == 10.0  # an explicit file replaces RENDERFARM_CONFIG


def test_unknown_key_in_the_file_is_named(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, 'lease_s = 30\nbrokr_url = "amqp://x"\n')
    with pytest.raises(ValueError, match="brokr_url") as info:
        load_settings(cfg, {})
    assert str(cfg) in str(info.value)
    with pytest.raises(ValueError, match="colour"):
        load_settings(None, {}, data_dir=tmp_path, colour="red")


@pytest.mark.parametrize(
    ("toml", "env", "name"),
    [
        ('lease_s = "abc"', {}, "lease_s"),
        ("", {"RENDERFARM_LEASE_S": "abc"}, "lease_s"),
        ("dispatch_window = 2.5", {}, "dispatch_window"),
        ("", {"RENDERFARM_DISPATCH_WINDOW": "many"}, "dispatch_window"),
        ("dispatch_window = true", {}, "dispatch_window"),
        ("", {"RENDERFARM_LOOPBACK_ONLY": "maybe"}, "loopback_only"),
        ('loopback_only = "perhaps"', {}, "loopback_only"),
        ("heartbeat_s = [1, 2]", {}, "heartbeat_s"),
        ("broker_url = 5", {}, "broker_url"),
    ],
)
def test_bad_types_are_named(tmp_path: Path, toml: str, env: dict[str, str], name: str) -> None:
    cfg = _toml(tmp_path, f'data_dir = "{tmp_path}"\n{toml}\n')
    with pytest.raises(ValueError, match=name):
        load_settings(cfg, env)


def test_good_values_of_each_type_are_converted(tmp_path: Path) -> None:
    env = {
        "RENDERFARM_LOOPBACK_ONLY": "no",
        "RENDERFARM_DISPATCH_WINDOW": " 7 ",
        "RENDERFARM_LEASE_S": "12.5",
        "RENDERFARM_BLENDER": "/opt/blender/blender",
    }
    s = load_settings(_toml(tmp_path, f'data_dir = "{tmp_path}"\nheartbeat_s = 2\n'), env)
    assert s.loopback_only is False and s.dispatch_window == 7 and s.lease_s == 12.5
    assert s.heartbeat_s == 2.0 and isinstance(s.heartbeat_s, float)
    assert s.blender == "/opt/blender/blender"
    assert load_settings(None, {"RENDERFARM_LOOPBACK_ONLY": "TRUE"}, data_dir=tmp_path).loopback_only is True


def test_missing_or_broken_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "farm.toml"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_settings(missing, {})
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_settings(None, {"RENDERFARM_CONFIG": str(missing)})
    broken = _toml(tmp_path, "lease_s = = 3\n")
    with pytest.raises(ValueError, match="not valid TOML") as info:
        load_settings(broken, {})
    assert str(broken) in str(info.value)


def test_secrets_are_not_in_the_repr(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, jwt_keys="k1:" + "jwt-SECRET" * 4, signing_key="key-SECRET")
    assert "SECRET" not in repr(s)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "mysql+aiomysql://rf:s3cr3t@db.example:3306/renderfarm?charset=utf8mb4",
            "mysql+aiomysql://rf:***@db.example:3306/renderfarm?charset=utf8mb4",
        ),
        ("amqp://guest:secret@127.0.0.1:5672/vhost", "amqp://guest:***@127.0.0.1:5672/vhost"),
        ("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("amqp://u:p%40ss@host/", "amqp://u:***@host/"),
        ("amqp://u:a@b@host/", "amqp://u:***@host/"),
        ("amqp://guest@127.0.0.1/", "amqp://guest@127.0.0.1/"),
        ("memory://", "memory://"),
        ("redis://cache:6379/0?password=hunter2&ssl=true", "redis://cache:6379/0?password=***&ssl=true"),
        (
            "s3://bucket/prefix?endpoint=http://minio:9000&Secret_Key=abc&region=eu",
            "s3://bucket/prefix?endpoint=http://minio:9000&Secret_Key=***&region=eu",
        ),
        ("sqlite+aiosqlite:////var/lib/rf/renderfarm.db", "sqlite+aiosqlite:////var/lib/rf/renderfarm.db"),
    ],
)
def test_redact_url_hides_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_url_of_an_unparsable_url_shows_nothing_of_it() -> None:
    out = redact_url("amqp://u:secret@[::1")
    assert "secret" not in out


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("lease_s = 0", "lease_s"),
        ("task_timeout_s = 0", "task_timeout_s"),
        ("max_attempts = 0", "max_attempts"),
        ("heartbeat_s = 60", "heartbeat_s"),  # longer than the 30 s lease
        ("heartbeat_s = 0", "heartbeat_s"),
    ],
)
def test_values_the_farm_cannot_work_with_are_refused_from_any_source(
    tmp_path: Path, toml: str, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        load_settings(_toml(tmp_path, toml + "\n"), {}, data_dir=tmp_path)
    key, value = (x.strip() for x in toml.split("="))
    with pytest.raises(ValueError, match=named):
        load_settings(None, {f"RENDERFARM_{key.upper()}": value}, data_dir=tmp_path)


def test_leftovers_of_interrupted_uploads_are_swept_at_start(tmp_path: Path) -> None:
    """A server killed mid-upload leaves its temporary folder; the next start removes what is
    older than the sweep age and keeps what may be an upload in progress."""
    import os
    import time as _time

    from server.config import Settings

    s = Settings(data_dir=tmp_path / "farm")
    s.ensure_dirs()
    old = s.tmp_dir / "upload-old"
    old.mkdir()
    (old / "upload.bin").write_bytes(b"x" * 1000)
    stale = _time.time() - 7 * 3600
    os.utime(old, (stale, stale))
    fresh = s.tmp_dir / "upload-fresh"
    fresh.mkdir()
    assert s.sweep_tmp() == ["upload-old"]
    assert not old.exists() and fresh.exists()
