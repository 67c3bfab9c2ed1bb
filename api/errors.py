"""REST errors: every error is JSON `{"error": <status name>, "message": <what went wrong>}`."""

from __future__ import annotations

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException


class ApiError(Exception):
    """An error answered to the client with `status` and `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, message)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> ResponseReturnValue:
    """The JSON body and status of an error."""
    names = {
        400: "bad request",
        401: "unauthorized",
        404: "not found",
        405: "method not allowed",
        409: "conflict",
        413: "too large",
        500: "internal error",
        503: "unavailable",
        504: "node timeout",
    }
    return jsonify({"error": names.get(status, "error"), "message": message}), status, headers or {}


def register_error_handlers(app: Flask) -> None:
    """Answer every error, ours and Werkzeug's, as JSON."""

    @app.errorhandler(ApiError)
    def api_error(error: ApiError) -> ResponseReturnValue:
        return error_response(error.status, error.message)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> ResponseReturnValue:
        return error_response(error.code or 500, error.description or error.name)

    @app.errorhandler(OperationalError)
    def database_busy(error: OperationalError) -> ResponseReturnValue:
        app.logger.warning("database unavailable: %s", error.orig)
        return error_response(503, "the database is busy or unreachable; try again shortly", {"Retry-After": "1"})

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> ResponseReturnValue:
        app.logger.exception("unhandled error")
        return error_response(500, f"{type(error).__name__}: the server failed; see its log")
