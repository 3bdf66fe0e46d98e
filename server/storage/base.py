"""The object storage interface.

Keys are relative, slash-separated names (``models/<id>/scene.blend``,
``jobs/<id>/frames/frame_000001.png``). Writes are atomic: an object either
exists whole or not at all.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._\-]*(/[A-Za-z0-9_][A-Za-z0-9._\-]*)*$")

READ_CHUNK = 1 << 20
"""Default size of the chunks :meth:`Storage.open_read` yields, in bytes."""


class StorageKeyError(ValueError):
    """A key that is not a plain relative name (``..``, absolute, odd characters)."""


class ObjectNotFoundError(FileNotFoundError):
    """No object is stored under the key that was read."""


class StorageUnavailableError(RuntimeError):
    """The storage cannot be used: bucket or folder missing, endpoint unreachable, credentials
    missing or refused. The message names the storage (its URL without secrets)."""


SECRET_HINTS = ("key", "secret", "token", "password", "passwd", "credential", "signature", "sig")


def redact_url(url: str) -> str:
    """``url`` fit for a message or a log: user info and the values of key-like query parameters masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{k}=***" if any(h in k.lower() for h in SECRET_HINTS) else (f"{k}={v}" if v else k)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class ChunkReader:
    """An async iterator over an object's bytes, read in a worker thread ``chunk_size`` at a time.

    ``read(n)`` returns up to ``n`` bytes (``b""`` at the end); ``close()`` releases the
    file or connection. It is closed at the end, on an error, or by :meth:`aclose`.
    """

    def __init__(self, read: Callable[[int], bytes], close: Callable[[], None], chunk_size: int) -> None:
        self._read = read
        self._close = close
        self._chunk = chunk_size
        self._closed = False

    def __aiter__(self) -> ChunkReader:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        fut = asyncio.get_running_loop().run_in_executor(None, self._read, self._chunk)
        try:
            chunk = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The read goes on in its thread: close once it is over, not under it.
            self._closed = True
            fut.add_done_callback(self._close_after)
            raise
        except BaseException:
            await self.aclose()
            raise
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    def _close_after(self, fut: asyncio.Future[bytes]) -> None:
        if not fut.cancelled():
            fut.exception()  # retrieved, so it is not reported as lost
        self._close()

    async def aclose(self) -> None:
        """Release the underlying file or connection (idempotent)."""
        if not self._closed:
            self._closed = True
            self._close()


def download_name(filename: str) -> str:
    """``filename`` reduced to ``[A-Za-z0-9._-]`` for a ``Content-Disposition`` header (never empty)."""
    return "".join(c for c in filename if c.isascii() and (c.isalnum() or c in "._-")) or "download"


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

    async def size(self, key: str) -> int | None:
        """The object's size in bytes, ``None`` when nothing is stored under ``key``."""

    def local_path(self, key: str) -> Path | None:
        """A filesystem path to read the object from, when the backend has one (else :meth:`open_read`)."""

    async def open_read(self, key: str, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """Start reading the object; returns an async iterator of its bytes (``chunk_size`` at most each).

        Use as ``async for chunk in await storage.open_read(key)``; an iterator left before
        its end should be closed (``contextlib.aclosing``) to release the connection or file.

        Raises:
            ObjectNotFoundError: when nothing is stored under ``key`` (raised by the await,
                before any byte is read).
            StorageUnavailableError: when the storage cannot be read.
        """

    def signed_url(self, key: str, ttl_s: int, filename: str | None = None) -> str:
        """A URL that downloads the object without other credentials, valid for ``ttl_s`` seconds.

        Relative to the API server (``/files/...``) for local storage, absolute (a
        presigned URL) for S3; clients resolve it against the server URL, which leaves an
        absolute URL as it is. ``filename`` names the download (``Content-Disposition``).
        """

    async def check(self) -> None:
        """Check that the storage can be used (call at start to fail fast).

        Raises:
            StorageUnavailableError: naming the storage and what is wrong (no secrets).
        """


def open_storage(url: str, secret: str) -> Storage:
    """Return the storage for ``url``: ``file:///abs/dir`` or ``s3://bucket[/prefix]?...``.

    See :mod:`server.storage.s3` for the ``s3://`` parameters (endpoint, region,
    addressing, ...). Nothing is contacted here; call :meth:`Storage.check` for that.

    Args:
        secret: key that signs local download URLs (S3 URLs are signed by S3's credentials).

    Raises:
        ValueError: naming the URL (without secrets) when it is malformed or its scheme
            is not supported.
    """
    parts = urlsplit(url)
    if parts.scheme == "file":
        from server.storage.local import LocalStorage

        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"bad storage URL {url!r}: file URLs take an absolute path, file:///dir")
        return LocalStorage(Path(unquote(parts.path)), secret)
    if parts.scheme == "s3":
        from server.storage.s3 import S3Storage

        return S3Storage.from_url(url)
    raise ValueError(
        f"unsupported storage URL {redact_url(url)!r}: expected file:///dir or s3://bucket[/prefix]?endpoint=..."
    )
