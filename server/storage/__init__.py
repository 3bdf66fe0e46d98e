"""Object storage behind one interface, chosen by URL (``file:///dir`` embedded)."""

from server.storage.base import Storage, StorageKeyError, open_storage

__all__ = ["Storage", "StorageKeyError", "open_storage"]
