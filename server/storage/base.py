"""The object storage interface.

Keys are relative, slash-separated names (``models/<id>/scene.blend``,
``jobs/<id>/frames/frame_000001.png``). Writes are atomic: an object either
exists whole or not at all.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._\-]*(/[A-Za-z0-9_][A-Za-z0-9._\-]*)*$")


class StorageKeyError(ValueError):
    """A key that is not a plain relative name (``..``, absolute, odd characters)."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object name.

    Raises:
        StorageKeyError: for ``..`` segments, absolute paths, empty segments or
            characters outside ``[A-Za-z0-9._-]``.
    """
    if not _KEY.match(key) or any(part in {".", ".."} for part in key.split("/")) or len(key) > 512:
        raise StorageKeyError(f"invalid storage key {key!r}")
    return key


class Storage(Protocol):
    """Where models and frames live."""

    async def put_file(self, key: str, src: Path) -> int:
        """Store the file at ``src`` under ``key`` (moving it when it can); returns its size in bytes."""

    async def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    async def delete(self, key: str) -> None:
        """Remove the object (no error if absent)."""

    def local_path(self, key: str) -> Path | None:
        """A filesystem path to read the object from, when the backend has one."""

    def signed_url(self, key: str, ttl_s: int, filename: str | None = None) -> str:
        """A URL that downloads the object without other credentials, valid for ``ttl_s`` seconds."""


def open_storage(url: str, secret: str) -> Storage:
    """Return the storage for ``url`` (``file:///abs/dir``).

    Args:
        secret: key that signs download URLs.

    Raises:
        ValueError: naming the URL when its scheme is not supported.
    """
    parts = urlsplit(url)
    if parts.scheme == "file":
        from server.storage.local import LocalStorage

        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"bad storage URL {url!r}: file URLs take an absolute path, file:///dir")
        return LocalStorage(Path(unquote(parts.path)), secret)
    raise ValueError(f"unsupported storage URL {url!r}: expected file:///dir")
