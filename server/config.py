"""Server settings.

Each backend is chosen by one URL. The embedded defaults keep everything in
one process and one data directory:

* database: ``sqlite+aiosqlite:///<data_dir>/renderfarm.db``
* broker: ``memory://`` (in-process queue)
* cache: ``memory://`` (in-process status cache and event bus)
* storage: ``file://<data_dir>/storage``
"""

from __future__ import annotations

import fcntl
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from server.model_manager.limits import ModelLimits


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
        heartbeat_s: how often agents heartbeat (and learn about cancels), in seconds.
        download_url_ttl_s: seconds a signed download link stays valid.
        max_frame_pixels: largest frame a job may ask for (width x height in pixels after
            the resolution percentage); 16384 x 16384 by default.
        blender: a Blender binary to use; ``None`` means ``blender`` on PATH, else bpy.
        loopback_only: the API listens on a loopback address only, so requests naming
            another host (DNS rebinding) are refused.
        limits: size and archive caps for uploaded models.
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
    heartbeat_s: float = 1.0
    download_url_ttl_s: int = 3600
    max_frame_pixels: int = 16384 * 16384
    blender: str | None = None
    loopback_only: bool = False
    limits: ModelLimits = field(default_factory=ModelLimits)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.data_dir / 'renderfarm.db'}"
        if not self.storage_url:
            self.storage_url = (self.data_dir / "storage").as_uri()

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
