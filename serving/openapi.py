"""OpenAPI documentation of the request bodies. The routes read their bodies themselves (JSON or
multipart, size-checked while streaming), so FastAPI cannot infer them: they are declared here,
with the pydantic request models added to the schema components."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from models.spec import MODALITIES
from serving import schemas

DESCRIPTION = """One embedding space for image, text, audio and video, served from the MLflow registry.

Every `/v1/*` route needs `Authorization: Bearer <token>`. Bodies are `application/json` (media as
base64 in `data`) or `multipart/form-data` (media as file parts named `image`, `audio`, `video`;
text as `text` fields; text-only forms may also be `application/x-www-form-urlencoded`). Errors are `{"error": {"code", "field", "message"}}` with a 4xx status:
400 malformed JSON / base64, 401 auth, 413 size limits, 415 content type, 422 invalid fields or
undecodable media; 503 / 504 when a backend is unavailable.
"""

REQUEST_MODELS = (schemas.EmbedIn, schemas.ZeroShotIn, schemas.SearchIn)
_FILE = {"type": "array", "items": {"type": "string", "format": "binary"}}
_TEXTS = {"type": "array", "items": {"type": "string"}}
EMBED_FORM = {"type": "object", "properties": {"text": _TEXTS, "image": _FILE, "audio": _FILE, "video": _FILE},
              "description": "parts in any order and number; the response keeps their order"}
_ONE = {"text": {"type": "string"}, "image": {"type": "string", "format": "binary"},
        "audio": {"type": "string", "format": "binary"}, "video": {"type": "string", "format": "binary"}}
ZERO_SHOT_FORM = {"type": "object", "description": "exactly one of text / image / audio / video",
                  "properties": {**_ONE, "labels": _TEXTS, "template": {"type": "string"},
                                 "top_k": {"type": "integer"}}, "required": ["labels"]}
SEARCH_FORM = {"type": "object", "description": "exactly one of text / image / audio / video",
               "properties": {**_ONE, "target": {"type": "string", "enum": list(MODALITIES)},
                              "k": {"type": "integer"}}, "required": ["target"]}


def body(model_name: str, form: dict) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model_name}"}},
        "multipart/form-data": {"schema": form}}}}


def install(app: FastAPI) -> None:
    """Generate the schema once, adding the request models (and their nested models) as components."""
    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_MODELS:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
        app.openapi_schema = spec
        return spec

    app.openapi = custom_openapi
