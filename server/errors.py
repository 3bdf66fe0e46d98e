"""Errors that reach the client as JSON: ``{"error": {"status", "message", "field"}}``."""

from __future__ import annotations


class ApiError(Exception):
    """An error with an HTTP status and a message naming what is wrong.

    Args:
        status: HTTP status code (4xx for the caller's mistakes).
        message: one sentence for a person, naming the value at fault.
        field: the request field at fault (``"frames"``, ``"model_id"``), if any.
    """

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, object]:
        """The JSON body of the error response."""
        body: dict[str, object] = {"status": self.status, "message": self.message}
        if self.field:
            body["field"] = self.field
        return {"error": body}


def not_found(kind: str, ident: str) -> ApiError:
    """A 404 for ``kind`` with id ``ident``."""
    return ApiError(404, f"{kind} {ident!r} not found", f"{kind}_id")
