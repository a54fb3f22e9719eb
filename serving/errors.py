"""One JSON error shape for every failure: `{"error": {"code", "field", "message"}}`.

Every handler here turns an exception into a response, so no request can take a replica down:
unexpected exceptions become a logged 500, never a crashed process. Every message and field goes
through `public_text` on its way out, so no response shows server paths, heap addresses or text
that cannot be encoded.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ray.serve")

# `<_io.BytesIO object at 0x7f...>` and the like: decoders put their input's repr in messages.
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{8,}\b")
# file:// and sqlite:/// URIs, then absolute paths: a "/" that starts a word (not the one in
# "application/json", "models:/name" or "s3://bucket/key").
_FILE_URI = re.compile(r"\b(?:file|sqlite):/+[^\s'\"<>(),;]*")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/@\\…-])/[^\s'\"<>(),;:/]+(?:/[^\s'\"<>(),;:/]*)*")


def _last_part(match: re.Match) -> str:
    parts = [p for p in match.group(0).split("/") if p]
    return f"…/{parts[-1]}" if parts else "…"


def public_text(text: str, limit: int = 500) -> str:
    """`text` fit for a response: object reprs and heap addresses removed, absolute server paths
    shortened to their last part (`…/shapesworld`), lone surrogates escaped, at most `limit` chars."""
    text = _OBJECT_REPR.sub("the input", str(text))
    text = _ADDRESS.sub("0x…", text)
    text = _FILE_URI.sub(_last_part, text)
    text = _ABSOLUTE_PATH.sub(_last_part, text)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit - 1] + "…"


class ApiError(Exception):
    """An expected failure of a request; `field` names the part of the request that caused it."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"code": code, "field": None if field is None else public_text(field, 200),
            "message": public_text(message, 1000)}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


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
