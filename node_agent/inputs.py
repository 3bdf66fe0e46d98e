"""The agent's input cache: each model fetched once, verified by SHA-256, kept read-only.

The cache holds at most ``max_bytes`` (the files as unpacked on disk); past that, the
models used least recently are removed, never the one just fetched (the agent renders one
task at a time, so that is the only one in use). A model's last use is the modification
time of its ``ready`` marker, touched on every fetch, so the order survives a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from protocol.messages import TaskSpec
from server.model_manager.archive import extract_zip
from server.model_manager.limits import ModelLimits

BLEND_NAME = "model.blend"
"""Name of a lone .blend in the cache."""
DEFAULT_MAX_BYTES = 20 << 30
"""Default cap of an agent's input cache: 20 GiB."""


class InputError(Exception):
    """The input could not be fetched, did not match its hash, or is not safe to unpack."""


class InputCache:
    """Models under ``root/<sha256>/files/``; a ``ready`` marker says a folder is complete and
    holds its size in bytes.

    Concurrent fetches of the same model in one process share one download.

    Args:
        root: the cache's folder.
        limits: caps on unpacking a zip package.
        max_bytes: the most the cache keeps on disk, in bytes (least recently used models go).

    Attributes:
        downloads: models downloaded since start (a cache hit downloads nothing).
        evicted: models removed to stay under ``max_bytes`` since start.
    """

    def __init__(
        self, root: Path, limits: ModelLimits | None = None, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.root = Path(root)
        self.limits = limits or ModelLimits()
        self.max_bytes = max_bytes
        self.downloads = 0
        self.evicted = 0
        self._locks: dict[str, asyncio.Lock] = {}

    def files_dir(self, spec: TaskSpec) -> Path:
        """The folder holding the model's files (the .blend and, for a package, everything else)."""
        return (self.root / spec.model_sha256 / "files").resolve()

    async def fetch(self, http: aiohttp.ClientSession, server_url: str, spec: TaskSpec) -> Path:
        """Return the path of the .blend to open for ``spec``, downloading the model if needed.

        Raises:
            InputError: on a download error, a SHA-256 mismatch, an unsafe archive or a
                main file outside the model's folder.
        """
        sha = spec.model_sha256
        if not sha or any(c not in "0123456789abcdef" for c in sha) or len(sha) != 64:
            raise InputError(f"bad model hash {sha!r}")
        folder = self.root / sha
        async with self._locks.setdefault(sha, asyncio.Lock()):
            if (folder / "ready").exists():
                (folder / "ready").touch()  # used now: the last to be evicted
            else:
                await self._download(http, server_url, spec, folder)
                self.downloads += 1
                for gone in await asyncio.to_thread(self._evict, sha):
                    self._locks.pop(gone, None)
        files = (folder / "files").resolve()
        # A lone .blend is cached under one name, whatever it was uploaded as: the same
        # content may come under several names, and the cache is keyed by content.
        main_rel = spec.model_main if spec.model_kind == "zip" else BLEND_NAME
        main = (files / (main_rel or "")).resolve()
        if not main.is_relative_to(files) or not main.is_file():
            raise InputError(f"main file {spec.model_main!r} is not inside the model")
        return main

    async def _download(
        self, http: aiohttp.ClientSession, server_url: str, spec: TaskSpec, folder: Path
    ) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.root))
        try:
            raw = staging / "download"
            h = hashlib.sha256()
            url, same_origin = input_url(server_url, spec.model_url)
            try:
                async with contextlib.AsyncExitStack() as stack:
                    if not same_origin:
                        # A presigned storage URL: the agent's own credentials stay with the
                        # server (and S3 refuses a presigned request that also has an
                        # Authorization header).
                        http = await stack.enter_async_context(
                            aiohttp.ClientSession(timeout=http.timeout, trust_env=False)
                        )
                    resp = await stack.enter_async_context(http.get(url))
                    if resp.status != 200:
                        raise InputError(f"download of the model failed: HTTP {resp.status}")
                    with open(raw, "wb") as fh:
                        async for chunk in resp.content.iter_chunked(1 << 20):
                            h.update(chunk)
                            fh.write(chunk)
            except aiohttp.ClientError as exc:
                raise InputError(f"download of the model failed: {type(exc).__name__}: {exc}") from exc
            if h.hexdigest() != spec.model_sha256:
                raise InputError("downloaded model does not match its SHA-256")
            files = staging / "files"
            files.mkdir()
            if spec.model_kind == "zip":
                await asyncio.to_thread(extract_zip, raw, files, self.limits)
                raw.unlink()
            else:
                os.replace(raw, files / BLEND_NAME)
            await asyncio.to_thread(_make_read_only, files)
            (staging / "ready").write_text(str(await asyncio.to_thread(_tree_bytes, files)))
            if folder.exists():
                await asyncio.to_thread(shutil.rmtree, folder, True)
            os.replace(staging, folder)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            raise

    def entries(self) -> list[tuple[float, int, str]]:
        """``(last use as a Unix time, size in bytes, sha256)`` of each complete model, oldest use first."""
        out = []
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            ready = d / "ready"
            if d.name.startswith(".") or not ready.is_file():
                continue
            try:
                size = int(ready.read_text() or 0)
            except (OSError, ValueError):
                size = _tree_bytes(d / "files")
            out.append((ready.stat().st_mtime, size, d.name))
        return sorted(out)

    def _evict(self, keep: str) -> list[str]:
        """Remove least recently used models (never ``keep``) until the cache fits; their hashes."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        gone = []
        for _, size, sha in entries:
            if total <= self.max_bytes:
                break
            if sha == keep:
                continue
            shutil.rmtree(self.root / sha, ignore_errors=True)
            gone.append(sha)
            total -= size
            self.evicted += 1
        return gone


def _tree_bytes(root: Path) -> int:
    """Bytes of the files under ``root``."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def input_url(server_url: str, url: str) -> tuple[URL, bool]:
    """Where to download an input the server named by ``url``, and whether that is the server itself.

    A relative URL (``/files/...``, local storage) is appended to ``server_url``; an
    absolute one (a presigned S3 URL) is used byte for byte, since re-quoting it could
    break its signature.

    Returns:
        (the URL, whether it has the server's scheme, host and port).
    """
    if urlsplit(url).scheme in ("http", "https"):
        full = URL(url, encoded=True)
        return full, full.origin() == URL(server_url).origin()
    return URL(server_url.rstrip("/") + url), True


def _make_read_only(root: Path) -> None:
    """Blender reads inputs only; make the files read-only so a render cannot change the cache.

    Files become 0444 and folders 0755: readable by the non-root user a container renders as
    (the Docker executor mounts the model's folder read-only), while the cache folder above
    them is 0700, so no other user of the machine can reach them.
    """
    os.chmod(root, 0o755)  # noqa: S103 (for the container user; the cache folder above is 0700)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), 0o755)  # noqa: S103 (as above)
        for name in files:
            p = os.path.join(dirpath, name)
            os.chmod(p, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
