"""Storage in a local folder; downloads go through HMAC-signed ``/files/`` URLs served by the API."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, urlencode

from server.storage.base import (
    READ_CHUNK,
    ChunkReader,
    ObjectNotFoundError,
    StorageUnavailableError,
    check_key,
)


class LocalStorage:
    """Objects are files under ``root``; every path is confined to it."""

    def __init__(self, root: Path, secret: str) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._secret = secret.encode()

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"storage key {key!r} escapes the storage root")
        return path

    async def put_file(self, key: str, src: Path) -> int:
        """See :meth:`server.storage.base.Storage.put_file`."""
        dest = self._path(key)
        return await asyncio.to_thread(_place, src, dest)

    async def exists(self, key: str) -> bool:
        """See :meth:`server.storage.base.Storage.exists`."""
        return self._path(key).is_file()

    async def delete(self, key: str) -> None:
        """See :meth:`server.storage.base.Storage.delete`."""
        self._path(key).unlink(missing_ok=True)

    async def size(self, key: str) -> int | None:
        """See :meth:`server.storage.base.Storage.size`."""
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def local_path(self, key: str) -> Path | None:
        """See :meth:`server.storage.base.Storage.local_path`."""
        return self._path(key)

    async def open_read(self, key: str, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """See :meth:`server.storage.base.Storage.open_read`."""
        path = self._path(key)
        try:
            fh = await asyncio.to_thread(open, path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFoundError(f"object {key!r} is not in storage") from None
        return ChunkReader(fh.read, fh.close, chunk_size)

    async def check(self) -> None:
        """See :meth:`server.storage.base.Storage.check`: the root folder must be writable."""
        probe = self.root / f".check.{os.getpid()}.{time.monotonic_ns()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StorageUnavailableError(
                f"storage folder {self.root} is not writable: {exc.strerror or exc}"
            ) from None

    def signed_url(self, key: str, ttl_s: int, filename: str | None = None) -> str:
        """See :meth:`server.storage.base.Storage.signed_url`."""
        check_key(key)
        exp = int(time.time()) + ttl_s
        query = {"exp": str(exp), "sig": self.sign(key, exp)}
        if filename:
            query["name"] = filename
        return f"/files/{quote(key)}?{urlencode(query)}"

    def sign(self, key: str, exp: int) -> str:
        """HMAC-SHA256 of ``key`` and expiry time ``exp`` (Unix seconds), hex."""
        return hmac.new(self._secret, f"{key}\n{exp}".encode(), hashlib.sha256).hexdigest()

    def verify(self, key: str, exp: str, sig: str) -> bool:
        """Whether ``sig`` is this storage's signature of ``key`` and ``exp`` and ``exp`` is in the future."""
        try:
            exp_i = int(exp)
        except ValueError:
            return False
        return exp_i >= time.time() and hmac.compare_digest(self.sign(key, exp_i), sig)


def _place(src: Path, dest: Path) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{time.monotonic_ns()}.part")
    try:
        try:
            os.replace(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest.stat().st_size
