"""One JSON error shape for every failure: `{"error": {"code", "field", "message"}}`.

Every handler here turns an exception into a response, so no request can take a replica down:
unexpected exceptions become a logged 500, never a crashed process.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ray.serve")


class ApiError(Exception):
    """An expected failure of a request; `field` names the part of the request that caused it."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "field": field, "message": message}},
                        status_code=status, headers=headers)


def field_path(loc: tuple) -> str:
    """pydantic's ("items", 1, "modality") -> "items[1].modality"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("body",):
            out += f".{part}" if out else str(part)
    return out or "body"


def validation_error(exc: ValidationError | RequestValidationError, prefix: str = "") -> ApiError:
    """The first problem of a pydantic validation as a 422 naming its field."""
    first = exc.errors()[0]
    path = field_path(tuple(first.get("loc", ())))
    field = f"{prefix}.{path}" if prefix and path != "body" else (prefix or path)
    return ApiError(422, "invalid_field", f"{field}: {first.get('msg', 'invalid')}", field)


def install_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), None, getattr(exc, "headers", None))

    async def request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc)
        return error_response(err.status, err.code, err.message, err.field)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"{type(exc).__name__} (see the replica log)")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(Exception, unexpected)
