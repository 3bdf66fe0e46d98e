"""Object storage behind one interface, chosen by URL (``file:///dir`` embedded, ``s3://bucket?...``)."""

from server.storage.base import (
    ObjectNotFoundError,
    Storage,
    StorageKeyError,
    StorageUnavailableError,
    download_name,
    open_storage,
    redact_url,
)

__all__ = [
    "ObjectNotFoundError",
    "Storage",
    "StorageKeyError",
    "StorageUnavailableError",
    "download_name",
    "open_storage",
    "redact_url",
]
