"""Errors the handlers turn into HTTP responses: `{"message": ...}` with a 4xx status."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A request the backend refuses; `details` are extra JSON fields for the response body."""

    status_code = 400

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"message": self.message, **self.details}


class BadRequest(ApiError):
    status_code = 400


class Forbidden(ApiError):
    status_code = 403


class NotFound(ApiError):
    status_code = 404


class Conflict(ApiError):
    status_code = 409


class Unprocessable(ApiError):
    status_code = 422


class SettingsError(RuntimeError):
    """The function's environment is missing or has a malformed setting (a deployment bug)."""
