"""Personal API tokens of the add-on, one per farm server, in a file only the user can read.

The file is ``credentials.json`` in the extension's own user folder
(``bpy.utils.extension_path_user``), not Blender's preferences: preferences are often copied
between machines and people, a token must not travel with them. Passwords are never stored;
logging in exchanges one for a token (see :mod:`.ops`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FILENAME = "credentials.json"


class TokenStore:
    """``{server_url: {"token", "token_id", "username", "expires_at"}}`` in ``folder/credentials.json``
    (mode 0600, written atomically)."""

    _cache: dict[Path, tuple[int, dict[str, dict[str, Any]]]] = {}
    """Parsed files by path, with the mtime (ns) they were read at: the panel asks on every redraw."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / FILENAME

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return {}
        cached = self._cache.get(self.path)
        if cached and cached[0] == mtime:
            return {k: dict(v) for k, v in cached[1].items()}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # unreadable or damaged: as if logged out (a login rewrites it)
        data = data if isinstance(data, dict) else {}
        self._cache[self.path] = (mtime, data)
        return {k: dict(v) for k, v in data.items() if isinstance(v, dict)}

    def get(self, server: str) -> dict[str, Any] | None:
        """The stored entry for ``server`` (a normalised URL), or ``None``."""
        entry = self._load().get(server)
        return entry if isinstance(entry, dict) and entry.get("token") else None

    def put(self, server: str, entry: dict[str, Any]) -> None:
        """Store ``entry`` for ``server``, replacing any earlier one.

        Raises:
            OSError: the folder or file cannot be written.
        """
        data = self._load()
        data[server] = entry
        self._write(data)

    def remove(self, server: str) -> dict[str, Any] | None:
        """Forget ``server``'s token; returns the removed entry."""
        data = self._load()
        entry = data.pop(server, None)
        self._write(data)
        return entry

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
