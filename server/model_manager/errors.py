"""The one error the model manager raises for a refused upload."""

from __future__ import annotations


class ModelRejected(Exception):
    """An uploaded model was refused; the HTTP layer turns it into a JSON error.

    Args:
        status: HTTP status: 400 (malformed: bad zip, unsafe entry, no or ambiguous
            main .blend), 413 (over a size, count or ratio cap), 415 (neither a
            .blend nor a zip), 422 (looks right but cannot be read: corrupt or
            truncated .blend, Blender could not open it).
        message: one sentence for a person, naming the file or zip entry at fault.
        field: the request field at fault (``"file"``, ``"main"``), or None.
    """

    def __init__(self, status: int, message: str, field: str | None = "file") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def __repr__(self) -> str:
        return f"ModelRejected({self.status}, {self.message!r}, field={self.field!r})"
