"""Server settings.

Each backend is chosen by one URL. The embedded defaults keep everything in
one process and one data directory:

* database: ``sqlite+aiosqlite:///<data_dir>/renderfarm.db``
* broker: ``memory://`` (in-process queue)
* cache: ``memory://`` (in-process status cache and event bus)
* storage: ``file://<data_dir>/storage``

A studio's farm names its own (``mysql+aiomysql://``, ``amqp://``, ``redis://``,
``s3://``). Settings come, highest first, from command-line flags, environment
variables ``RENDERFARM_<FIELD>`` (``RENDERFARM_DATABASE_URL``...), a TOML config
file (``--config`` or ``RENDERFARM_CONFIG``; keys are the field names) and the
defaults below. See :func:`load_settings`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import math
import os
import secrets
import shutil
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.model_manager.limits import ModelLimits
from server.urls import redact_url  # noqa: F401  (re-exported: the CLI names backends with it)


@dataclass
class Settings:
    """Everything the server needs to start.

    Attributes:
        data_dir: folder for the SQLite file, local storage, temp uploads and secrets.
        database_url / broker_url / cache_url / storage_url: backend URLs; empty means
            the embedded default under ``data_dir``.
        max_attempts: attempts per task before it fails (a lost lease counts as one).
        lease_s: seconds an agent's lease lasts without a heartbeat.
        task_timeout_s: hard limit of one render attempt, in seconds.
        stall_timeout_s: an attempt with no Blender output for this long is killed.
        heartbeat_s: how often agents heartbeat (and learn about cancels), in seconds (default 5,
            with the 30 s lease: six heartbeats may be lost before a task is taken back).
        download_url_ttl_s: seconds a signed download link stays valid.
        max_frame_pixels: largest frame a job may ask for (width x height in pixels after
            the resolution percentage); 16384 x 16384 by default.
        blender: a Blender binary to use; ``None`` means ``blender`` on PATH, else bpy.
        loopback_only: the API listens on a loopback address only, so requests naming
            another host (DNS rebinding) are refused.
        limits: size and archive caps for uploaded models.
        jwt_keys: keys signing access tokens, ``kid:secret`` pairs separated by commas; the
            first signs, every one verifies (so a key can be rotated in, then the old one
            retired). Empty means one generated and kept in ``data_dir/secrets/jwt-key``; a farm
            of several servers sets the same value on each. Secrets have at least 32 characters.
        access_token_ttl_s: life of an access token, in seconds (default 15 minutes).
        refresh_token_ttl_s: life of a refresh token, in seconds (default 30 days).
        login_max_failures: failed logins of one account within ``login_window_s`` after
            which its logins are refused with 429 until the window moves on.
        login_max_failures_ip: the same, counted per client IP address.
        login_window_s: the throttling window, in seconds.
        trusted_proxies: addresses or networks (``10.0.0.5, 10.1.0.0/16``) of reverse proxies
            in front of the servers; a request from one of them is taken to come from the last
            address in its ``X-Forwarded-For`` that is not a trusted proxy (for login
            throttling and the audit log). Empty: the peer address is the client's.
        signing_key: key of signed download URLs; empty means one kept in ``data_dir/secrets``.
        agent_broker_url: the broker URL handed to agents that register (default: ``broker_url``;
            set it when agents reach the broker by another name or with other credentials).
        dispatch_window: tasks per pool waiting in the broker at a time; 0 means twice the
            pool's online agents, at least 4.
        reconcile_s: seconds between reconciler passes (database vs broker and cache).
        status_interval_s: the longest a coalesced job summary waits before it is published.
        task_failure_agents: a failed attempt sends its task back to the queue, for another
            agent, until this many different agents failed it; then it fails for good (at once
            when no other agent could take it). At least 1 (1: the first failure is final).
        blocklist_after: an agent whose attempts failed this many times in one job takes no
            more of that job's tasks until someone clears it (``DELETE
            /api/jobs/{id}/blocklist/{agent}``); 0 never blocklists.
        retry_backoff_s: a task failed ``k`` times waits ``retry_backoff_s * 2 ** (k - 1)``
            seconds before it is dispatched again ...
        retry_backoff_max_s: ... at most this many seconds.
        max_failed_task_share: a job fails at once, its remaining tasks canceled, when more than
            this share (0 to 1) of its tasks failed for good; 1.0 lets every task run to its end.
    """

    data_dir: Path
    database_url: str = ""
    broker_url: str = "memory://"
    cache_url: str = "memory://"
    storage_url: str = ""
    max_attempts: int = 3
    lease_s: float = 30.0
    task_timeout_s: float = 3600.0
    stall_timeout_s: float = 600.0
    heartbeat_s: float = 5.0
    download_url_ttl_s: int = 3600
    max_frame_pixels: int = 16384 * 16384
    blender: str | None = None
    loopback_only: bool = False
    limits: ModelLimits = field(default_factory=ModelLimits)
    jwt_keys: str = field(default="", repr=False)
    access_token_ttl_s: float = 900.0
    refresh_token_ttl_s: float = 30 * 86400.0
    login_max_failures: int = 5
    login_max_failures_ip: int = 20
    login_window_s: float = 900.0
    trusted_proxies: str = ""
    signing_key: str = field(default="", repr=False)
    agent_broker_url: str = field(default="", repr=False)
    dispatch_window: int = 0
    reconcile_s: float = 10.0
    status_interval_s: float = 0.2
    task_failure_agents: int = 3
    blocklist_after: int = 3
    retry_backoff_s: float = 10.0
    retry_backoff_max_s: float = 300.0
    max_failed_task_share: float = 0.5

    def __post_init__(self) -> None:
        self.check()
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.data_dir / 'renderfarm.db'}"
        if not self.storage_url:
            self.storage_url = (self.data_dir / "storage").as_uri()

    def check(self) -> None:
        """Refuse values the farm cannot work with, whichever source they came from.

        Raises:
            ValueError: naming the setting: timeouts and the lease under 1 s, no attempts,
                a heartbeat that is not well inside the lease (agents would lose their
                leases between two heartbeats), a negative dispatch window.
        """
        minimums = {"lease_s": 1.0, "task_timeout_s": 1.0, "stall_timeout_s": 1.0, "max_attempts": 1}
        for name, low in minimums.items():
            if getattr(self, name) < low:
                raise ValueError(f"setting {name} must be at least {low:g}, not {getattr(self, name)!r}")
        if not 0 < self.heartbeat_s <= self.lease_s / 2:
            raise ValueError(
                f"setting heartbeat_s ({self.heartbeat_s:g}) must be above 0 and at most half of "
                f"lease_s ({self.lease_s:g}), so that a live agent never loses its lease"
            )
        if self.access_token_ttl_s < 10 or self.refresh_token_ttl_s < self.access_token_ttl_s:
            raise ValueError(
                "setting access_token_ttl_s must be at least 10 s and refresh_token_ttl_s at least as long"
            )
        if self.login_max_failures < 1 or self.login_max_failures_ip < 1 or self.login_window_s < 1:
            raise ValueError("settings login_max_failures(_ip) and login_window_s must be at least 1")
        try:
            self.proxy_networks()
        except ValueError as exc:
            raise ValueError(f"setting trusted_proxies: {exc}") from None
        if self.dispatch_window < 0 or self.reconcile_s <= 0 or self.status_interval_s < 0:
            raise ValueError(
                "settings dispatch_window and status_interval_s must not be negative, reconcile_s above 0"
            )
        self._check_failure_policy()

    def _check_failure_policy(self) -> None:
        """Raises ValueError naming the failure-policy setting that is out of range."""
        if self.task_failure_agents < 1:
            raise ValueError(
                f"setting task_failure_agents must be at least 1, not {self.task_failure_agents!r}"
            )
        if self.blocklist_after < 0:
            raise ValueError(
                f"setting blocklist_after must be 0 (never) or more, not {self.blocklist_after!r}"
            )
        for name in ("retry_backoff_s", "retry_backoff_max_s", "max_failed_task_share"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"setting {name} must be a number, not {value!r}")
        if not 0 <= self.retry_backoff_s <= self.retry_backoff_max_s:
            raise ValueError(
                f"setting retry_backoff_s ({self.retry_backoff_s:g}) must be 0 or more and at most "
                f"retry_backoff_max_s ({self.retry_backoff_max_s:g})"
            )
        if not 0 <= self.max_failed_task_share <= 1:
            raise ValueError(
                f"setting max_failed_task_share must be between 0 and 1 (1: never fail a job early), "
                f"not {self.max_failed_task_share!r}"
            )

    def retry_delay_s(self, failures: int) -> float:
        """Seconds a task whose attempts failed ``failures`` times (1 or more) waits before the next:
        ``retry_backoff_s * 2 ** (failures - 1)``, at most ``retry_backoff_max_s``."""
        exponent = min(max(failures, 1) - 1, 60)
        return min(self.retry_backoff_s * 2.0**exponent, self.retry_backoff_max_s)

    @property
    def tmp_dir(self) -> Path:
        """Folder for uploads in progress (same filesystem as local storage)."""
        return self.data_dir / "tmp"

    def ensure_dirs(self) -> None:
        """Create the data folders, readable by the owner only.

        Raises:
            ValueError: naming the data folder when it cannot be created or written.
        """
        try:
            for d in (self.data_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, 0o700)
        except OSError as exc:
            raise ValueError(f"data dir {self.data_dir} is not usable: {exc.strerror or exc}") from exc

    def sweep_tmp(self, older_than_s: float = 6 * 3600) -> list[str]:
        """Remove what uploads left in :attr:`tmp_dir` more than ``older_than_s`` seconds ago (a
        server killed mid-upload cannot clean up after itself); returns the names removed.
        Entries of uploads in progress are younger, whatever server process they belong to."""
        removed = []
        cutoff = time.time() - older_than_s
        for entry in self.tmp_dir.iterdir() if self.tmp_dir.is_dir() else []:
            try:
                if entry.lstat().st_mtime >= cutoff:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry.name)
            except OSError:
                continue  # gone already, or not ours to remove
        return removed

    def lock_data_dir(self) -> int:
        """Take an exclusive lock on the data folder; returns the lock's file descriptor.

        Two farms sharing one SQLite file and one set of agent folders would corrupt
        each other's work, so a second one is refused. The lock goes with the process.

        Raises:
            ValueError: when another process holds the lock (naming its pid).
        """
        path = self.data_dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(
                f"data dir {self.data_dir} is in use by another renderfarm (pid {holder}); "
                "stop it or choose another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return fd

    def proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """``trusted_proxies`` parsed. Raises ValueError naming an entry that is not an address or network."""
        return [
            ipaddress.ip_network(p.strip(), strict=False)
            for p in self.trusted_proxies.split(",")
            if p.strip()
        ]

    def jwt_keyring(self) -> tuple[str, dict[str, str]]:
        """``(kid that signs, {kid: secret})`` from ``jwt_keys``, else one key kept in the data folder.

        Raises:
            ValueError: naming ``jwt_keys`` when a pair is not ``kid:secret``, a kid repeats or is
                not ``[A-Za-z0-9_.-]``, or a secret is shorter than 32 characters (RFC 7518 3.2
                wants a key at least as long as the HS256 hash, 256 bits).
        """
        if not self.jwt_keys.strip():
            return "local", {"local": self.secret("jwt-key")}
        keys: dict[str, str] = {}
        first = ""
        for pair in self.jwt_keys.split(","):
            kid, sep, secret = pair.strip().partition(":")
            if not sep or not kid or not all(c.isascii() and (c.isalnum() or c in "_.-") for c in kid):
                raise ValueError("setting jwt_keys must be kid:secret pairs separated by commas")
            if kid in keys:
                raise ValueError(f"setting jwt_keys names key id {kid!r} twice")
            if len(secret) < 32:
                raise ValueError(f"setting jwt_keys: the secret of key {kid!r} is shorter than 32 characters")
            keys[kid] = secret
            first = first or kid
        return first, keys

    def signing_secret(self) -> str:
        """The signing key of download URLs: ``signing_key`` if set, else one kept in the data folder."""
        return self.signing_key or self.secret("storage-signing-key")

    def secret(self, name: str) -> str:
        """Return a random secret kept in ``data_dir/secrets/<name>`` (mode 0600), made on first use."""
        folder = self.data_dir / "secrets"
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        path = folder / name
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32))
        return path.read_text().strip()


SECRET_FIELDS = frozenset({"jwt_keys", "signing_key"})
"""Settings never printed or logged."""
_LOADABLE = {f.name: f.type for f in dataclasses.fields(Settings) if f.name not in ("limits",)}


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _convert(name: str, value: Any) -> Any:
    """``value`` (from TOML or an environment variable) as the type of setting ``name``.

    Raises:
        ValueError: naming the setting when the value is not of its type: a boolean is
            true/false (or 1/0, yes/no, on/off), an integer has no fraction, a number is
            finite and not negative, a text setting is a string.
    """
    kind = str(_LOADABLE[name]).strip("'")
    text = value.strip() if isinstance(value, str) else None
    shown = "a hidden value" if name in SECRET_FIELDS else repr(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"setting {name} must be true or false, not {shown}")
    if kind in ("int", "float"):
        number: float | int | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif text:
            try:
                number = int(text) if kind == "int" else float(text)
            except ValueError:
                number = None
        if kind == "int" and isinstance(number, float):
            number = None
        if number is None or not math.isfinite(number) or number < 0:
            what = "a whole number" if kind == "int" else "a number"
            raise ValueError(f"setting {name} must be {what} of 0 or more, not {shown}")
        return int(number) if kind == "int" else float(number)
    if not isinstance(value, str):
        raise ValueError(f"setting {name} must be a string, not {shown}")
    return value


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    **flags: Any,
) -> Settings:
    """Settings from ``flags`` (``None`` values ignored), then the environment, then a TOML file.

    Args:
        config_file: a TOML file of ``field = value`` pairs; default ``RENDERFARM_CONFIG`` if set.
        env: the environment (default ``os.environ``); ``RENDERFARM_<FIELD>`` variables.
        flags: field values from the command line.

    Raises:
        ValueError: naming the config file when it cannot be read or parsed, an unknown key,
            or a value of the wrong type.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_file or (Path(env["RENDERFARM_CONFIG"]) if env.get("RENDERFARM_CONFIG") else None)
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"config file {path}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc
        for key, value in data.items():
            if key not in _LOADABLE:
                raise ValueError(
                    f"config file {path}: unknown setting {key!r}; known: {', '.join(sorted(_LOADABLE))}"
                )
            values[key] = _convert(key, value)
    for name in _LOADABLE:
        raw = env.get(f"RENDERFARM_{name.upper()}")
        if raw not in (None, ""):
            values[name] = _convert(name, raw)
    for name, value in flags.items():
        if value is None:
            continue
        if name not in _LOADABLE:
            raise ValueError(f"unknown setting {name!r}")
        values[name] = value
    values.setdefault("data_dir", DEFAULT_DATA_DIR)
    return Settings(**values)


DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "renderfarm"
"""Where the embedded farm keeps its database, storage and secrets by default."""
