"""HTTP request -> validated `Item`s and options, enforcing the size limits before any decoding.

Checks run cheapest first: declared Content-Length (413 without reading), the streamed body size,
the content type (415), JSON / multipart syntax (400), fields (422), per-item sizes and counts (413).
Media bytes are decoded later by the Embedder with the shared `models.decode` functions.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from models.decode import EXTS_OF
from models.spec import MODALITIES
from serving.errors import ApiError, validation_error
from serving.schemas import ItemIn
from serving.settings import Limits

# A JSON escape that can produce a surrogate code point: only bodies holding one are walked.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
MIME_EXT = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "audio/wav": "wav",
            "audio/x-wav": "wav", "audio/wave": "wav", "audio/flac": "flac", "audio/ogg": "ogg",
            "audio/mpeg": "mp3", "audio/mp4": "m4a", "video/mp4": "mp4", "video/webm": "webm",
            "video/x-matroska": "mkv"}


@dataclass(frozen=True)
class Item:
    """One validated input: text, or media bytes with the extension that picks its demuxer."""

    modality: str
    field: str  # where it came from in the request, for error messages: "items[2]"
    text: str = ""
    data: bytes = b""
    ext: str = ""


# ----------------------------------------------------------------------------- body
async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_content_length", "Content-Length must be a number", "Content-Length")
        if int(declared) > max_bytes:
            raise ApiError(413, "body_too_large", f"body of {declared} bytes > limit {max_bytes}", "body")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:  # chunked uploads declare no length: count while reading
            raise ApiError(413, "body_too_large", f"body > limit {max_bytes} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)


def body_kind(request: Request) -> str:
    """'json' or 'form' (multipart, or urlencoded: text-only forms such as `curl -d text=...`) from
    Content-Type; anything else is 415."""
    ctype = request.headers.get("content-type", "")
    main = ctype.split(";", 1)[0].strip().lower()
    if main == "application/json" or (main.startswith("application/") and main.endswith("+json")):
        return "json"
    if main in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return "form"
    raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json, multipart/form-data or "
                   f"application/x-www-form-urlencoded, got {ctype or 'none'!r}",
                   "Content-Type")


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # includes invalid UTF-8 and absurd nesting
        raise ApiError(400, "malformed_json", f"body is not valid JSON: {str(exc)[:200]}", "body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "malformed_json", f"body must be a JSON object, got {type(data).__name__}", "body")
    if _SURROGATE_ESCAPE.search(body):
        try:
            where = invalid_text_path(data)
        except RecursionError:
            raise ApiError(400, "malformed_json", "body is nested too deeply", "body") from None
        if where is not None:
            raise invalid_text(where)
    return data


def is_valid_text(text: str) -> bool:
    """False for strings that are not Unicode text: JSON's `"\\ud800"` decodes to a lone surrogate,
    which can be neither tokenized nor written back into a UTF-8 response."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def invalid_text(field: str) -> ApiError:
    # The value itself is never echoed: it is exactly what cannot be encoded.
    return ApiError(422, "invalid_text", f"{field}: not valid Unicode text (it holds a lone UTF-16 "
                    "surrogate); send UTF-8 text", field)


def check_text(text: str, field: str) -> str:
    if not is_valid_text(text):
        raise invalid_text(field)
    return text


def invalid_text_path(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON body the first invalid string sits ("items[0].text", "labels[2]"),
    in the field-path form of error messages; a bad key is reported at its object."""
    if isinstance(value, str):
        return None if is_valid_text(value) else (path or "body")
    if isinstance(value, dict):
        for key, child in value.items():
            if not is_valid_text(key):
                return path or "body"
            found = invalid_text_path(child, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found = invalid_text_path(child, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def validate(model: type[BaseModel], data: dict[str, Any], prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, prefix) from None


# ----------------------------------------------------------------------------- multipart
async def read_form(request: Request, body: bytes, limits: Limits) -> list[tuple[str, str | bytes, str]]:
    """Multipart body -> [(name, value, filename-or-content-type hint)]; files read into bytes."""
    async def replay() -> dict:  # the body is already read (and size-checked): parse that copy
        return {"type": "http.request", "body": body, "more_body": False}

    copy = Request(request.scope, replay)
    try:
        form = await copy.form(max_files=limits.max_items + 1, max_fields=limits.max_labels + 16,
                               max_part_size=limits.max_text_chars * 4 + 1024)
    except Exception as exc:  # starlette raises HTTPException(400) / MultiPartException
        message = str(getattr(exc, "detail", exc))
        status = 413 if "Too many" in message or "exceeded maximum size" in message else 400
        raise ApiError(status, "malformed_multipart", f"multipart body: {message}", "body") from None
    parts: list[tuple[str, str | bytes, str]] = []
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                hint = value.filename or ""
                parts.append((name, await value.read(), f"{hint}|{value.content_type or ''}"))
            else:
                parts.append((name, value, ""))
    finally:
        await form.close()
    return parts


def form_split(parts: list[tuple[str, str | bytes, str]], limits: Limits,
               repeated: tuple[str, ...] = ()) -> tuple[list[Item], dict[str, Any]]:
    """Parts named after a modality become items (in form order); the rest become options."""
    items: list[Item] = []
    options: dict[str, Any] = {}
    for name, value, hint in parts:
        if name in MODALITIES:
            items.append(form_item(name, value, hint, f"{name}[{len(items)}]", limits))
        elif name in repeated:
            options.setdefault(name, []).append(value if isinstance(value, str) else value.decode("utf-8", "replace"))
        elif name in options:
            raise ApiError(422, "invalid_field", f"{name}: given more than once", name)
        else:
            options[name] = value if isinstance(value, str) else value.decode("utf-8", "replace")
    return items, options


def form_item(modality: str, value: str | bytes, hint: str, field: str, limits: Limits) -> Item:
    if modality == "text":
        text = value if isinstance(value, str) else value.decode("utf-8", "replace")
        return text_item(text, field, limits)
    if isinstance(value, str):
        raise ApiError(422, "invalid_field", f"{field}: {modality} must be a file upload "
                       f"(curl -F {modality}=@FILE)", field)
    filename, _, content_type = hint.partition("|")
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else MIME_EXT.get(content_type.lower(), "")
    return media_item(modality, value, ext if ext in EXTS_OF[modality] else "", field, limits)


# ----------------------------------------------------------------------------- items
def text_item(text: str, field: str, limits: Limits) -> Item:
    check_text(text, field)
    if not text.strip():
        raise ApiError(422, "empty_text", f"{field}: text must not be empty", field)
    if len(text) > limits.max_text_chars:
        raise ApiError(413, "text_too_long", f"{field}: {len(text)} characters > limit {limits.max_text_chars}",
                       field)
    return Item("text", field, text=text)


def media_item(modality: str, data: bytes, ext: str, field: str, limits: Limits) -> Item:
    if not data:
        raise ApiError(422, "empty_media", f"{field}: zero-byte {modality}", field)
    if len(data) > limits.max_item_bytes:
        raise ApiError(413, "item_too_large", f"{field}: {len(data)} bytes > limit {limits.max_item_bytes}", field)
    return Item(modality, field, data=data, ext=ext or sniff_ext(modality, data))


def json_item(item: ItemIn, field: str, limits: Limits) -> Item:
    """A validated JSON item -> Item: text, or base64 media (strictly decoded)."""
    if item.modality == "text":
        if item.text is None or item.data is not None:
            raise ApiError(422, "invalid_field", f"{field}.text: a text item needs `text` (and no `data`)",
                           f"{field}.text")
        return text_item(item.text, f"{field}.text", limits)
    if item.data is None or item.text is not None:
        raise ApiError(422, "invalid_field", f"{field}.data: a {item.modality} item needs base64 `data` "
                       "(and no `text`)", f"{field}.data")
    data, mime_ext = decode_base64(item.data, f"{field}.data", limits)
    ext = (item.format or mime_ext or "").lower().lstrip(".")
    if ext and ext not in EXTS_OF[item.modality]:
        raise ApiError(422, "unsupported_format", f"{field}.format: {ext!r} is not a {item.modality} format; "
                       f"choose from {list(EXTS_OF[item.modality])}", f"{field}.format")
    return media_item(item.modality, data, ext, f"{field}.data", limits)


def decode_base64(text: str, field: str, limits: Limits) -> tuple[bytes, str]:
    """Strict base64 (line breaks allowed, `data:<mime>;base64,` prefix allowed) -> (bytes, ext hint)."""
    mime_ext = ""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise ApiError(400, "bad_base64", f"{field}: a data URL must look like data:<mime>;base64,<data>", field)
        mime_ext = MIME_EXT.get(header[5:].split(";", 1)[0].lower(), "")
    if len(text) * 3 // 4 > limits.max_item_bytes + 3:  # refuse before allocating the decoded copy
        raise ApiError(413, "item_too_large", f"{field}: about {len(text) * 3 // 4} bytes > limit "
                       f"{limits.max_item_bytes}", field)
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact, validate=True), mime_ext
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "bad_base64", f"{field}: not valid base64 ({exc})", field) from None


def sniff_ext(modality: str, data: bytes) -> str:
    """The container from its magic bytes, so clients need not send a format (decoders still
    fall back to FFmpeg's own probing when this guess is wrong)."""
    head = data[:16]
    if modality == "image":
        return "png" if head.startswith(b"\x89PNG") else "webp" if head[8:12] == b"WEBP" else "jpg"
    if head[4:8] == b"ftyp":
        return "m4a" if modality == "audio" else "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm" if modality == "video" else "m4a"  # matroska audio: PyAV probes it
    if modality == "audio":
        if head.startswith(b"fLaC"):
            return "flac"
        if head.startswith(b"OggS"):
            return "ogg"
        if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
            return "mp3"
        return "wav"
    return "mp4"
