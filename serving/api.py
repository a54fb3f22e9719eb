"""The HTTP API (FastAPI): routes, auth, limits and metrics. Backends are reached through
`Services` (Serve deployment handles in production, local-testing-mode handles in tests).

Routes: POST /v1/embed, POST /v1/zero-shot, POST /v1/search, GET /v1/model (all Bearer-token
protected), GET /healthz, GET /readyz, GET /metrics, and the OpenAPI schema at /openapi.json
(the interactive pages /docs and /redoc only with `gateway.interactive_docs`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter as Tally
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serving import openapi
from serving.auth import check_bearer
from serving.errors import ApiError, install_handlers, public_text
from serving.inputs import (
    Item,
    body_kind,
    check_text,
    form_split,
    json_item,
    parse_json,
    read_body,
    read_form,
    validate,
)
from serving.metrics import RequestMetrics, Timer
from serving.schemas import (
    EmbedIn,
    EmbedOut,
    ErrorOut,
    SearchIn,
    SearchOptions,
    SearchOut,
    ZeroShotIn,
    ZeroShotOptions,
    ZeroShotOut,
)
from serving.settings import GatewayConfig, Limits

log = logging.getLogger("ray.serve")
SIZE_REASONS = {"too_large", "too_many_pixels", "audio_too_long", "video_too_long"}
ENDPOINTS = {"/v1/embed", "/v1/zero-shot", "/v1/search", "/v1/model", "/healthz", "/readyz", "/metrics"}
# Declares the Bearer scheme in the OpenAPI docs ("Authorize" button); the check itself is
# check_bearer (constant-time), so auto_error is off.
BEARER = Depends(HTTPBearer(auto_error=False, description="the serving token (RAYBIND_SERVE_TOKEN or token file)"))
ERRORS = {code: {"model": ErrorOut} for code in (400, 401, 413, 415, 422, 503, 504)}


@dataclass
class Services:
    embedder: Any  # DeploymentHandle of serving.embedder.Embedder
    searcher: Any  # DeploymentHandle of serving.searcher.Searcher
    config: GatewayConfig
    token: str
    metrics: RequestMetrics


async def call(method: Any, *args: Any, timeout: float) -> Any:
    """A backend call that can only fail as 503 / 504, never as an unhandled exception."""
    try:
        return await asyncio.wait_for(method.remote(*args), timeout)
    except TimeoutError:
        raise ApiError(504, "backend_timeout", f"the backend did not answer within {timeout:.0f} s") from None
    except Exception as exc:  # replica died, back-pressure, ...: the client may retry
        log.warning("backend call failed: %s: %s", type(exc).__name__, exc)
        raise ApiError(503, "backend_unavailable", f"backend unavailable ({type(exc).__name__}); retry") from None


def item_error(error: dict) -> ApiError:
    status = 413 if error["reason"] in SIZE_REASONS else 422
    return ApiError(status, error["reason"], f"{error['field']}: {error['reason']}: {error['detail']}",
                    error["field"])


def count_items(request: Request, items: list[Item]) -> None:
    request.scope["raybind.modalities"] = Tally(item.modality for item in items)


# ----------------------------------------------------------------------------- request parsing
async def read_request(request: Request, limits: Limits) -> tuple[str, bytes]:
    kind = body_kind(request)  # 415 before reading a byte of the body
    return kind, await read_body(request, limits.max_body_bytes)


async def embed_items(request: Request, limits: Limits) -> list[Item]:
    kind, body = await read_request(request, limits)
    if kind == "json":
        req = validate(EmbedIn, parse_json(body))
        check_count(len(req.items), limits)
        return [json_item(item, f"items[{i}]", limits) for i, item in enumerate(req.items)]
    items, options = form_split(await read_form(request, body, limits), limits)
    if options:
        raise ApiError(422, "invalid_field", f"unknown form field(s) {sorted(options)}; send text, image, "
                       "audio or video parts", sorted(options)[0])
    if not items:
        raise ApiError(422, "invalid_field", "items: no text / image / audio / video parts", "items")
    check_count(len(items), limits)
    return items


def check_count(count: int, limits: Limits) -> None:
    if count > limits.max_items:
        raise ApiError(413, "too_many_items", f"items: {count} > limit {limits.max_items} per request", "items")


async def one_item_request(request: Request, limits: Limits, json_model: type, options_model: type,
                           item_field: str, repeated: tuple[str, ...] = ()) -> tuple[Item, Any]:
    """A request with one media/text item plus options (zero-shot, search), JSON or multipart."""
    kind, body = await read_request(request, limits)
    if kind == "json":
        req = validate(json_model, parse_json(body))
        return json_item(getattr(req, item_field), item_field, limits), req
    items, options = form_split(await read_form(request, body, limits), limits, repeated)
    if len(items) != 1:
        raise ApiError(422, "invalid_field", f"{item_field}: send exactly one text / image / audio / video "
                       f"part, got {len(items)}", item_field)
    return items[0], validate(options_model, options)


def zero_shot_prompts(opts: ZeroShotOptions, limits: Limits) -> list[str]:
    if len(opts.labels) > limits.max_labels:
        raise ApiError(413, "too_many_labels", f"labels: {len(opts.labels)} > limit {limits.max_labels}", "labels")
    for i, label in enumerate(opts.labels):  # labels and template are echoed in the response
        check_text(label, f"labels[{i}]")
    check_text(opts.template, "template")
    too_long = [i for i, label in enumerate(opts.labels) if len(label) > limits.max_text_chars]
    if too_long or len(opts.template) > limits.max_text_chars:
        field = f"labels[{too_long[0]}]" if too_long else "template"
        raise ApiError(413, "text_too_long", f"{field}: longer than {limits.max_text_chars} characters", field)
    if "{label}" in opts.template:
        return [opts.template.replace("{label}", label) for label in opts.labels]
    return [opts.template.replace("{}", label, 1) for label in opts.labels]


def rank_labels(labels: list[str], scores: list[float], scale: float, top_k: int | None) -> list[dict]:
    logits = [scale * s for s in scores]
    peak = max(logits)
    weights = [math.exp(v - peak) for v in logits]  # softmax, shifted for stability
    total = sum(weights)
    ranked = sorted(zip(labels, weights, scores, strict=True), key=lambda t: -t[1])
    return [{"label": label, "probability": round(w / total, 6), "score": round(s, 6)}
            for label, w, s in ranked[:top_k]]


# ----------------------------------------------------------------------------- the app
def build_api(services: Services) -> FastAPI:
    # Swagger UI and ReDoc pages load their scripts from a public CDN: off unless asked for.
    docs = services.config.interactive_docs
    app = FastAPI(title="raybind", version="1", description=openapi.DESCRIPTION,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    install_handlers(app)
    async def authorized(request: Request, _: HTTPAuthorizationCredentials | None = BEARER) -> None:
        check_bearer(request.headers.get("authorization"), services.token)

    add_probe_routes(app, services)
    add_v1_routes(app, services, Depends(authorized))
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)
    openapi.install(app)
    return app


def add_probe_routes(app: FastAPI, services: Services) -> None:
    timeout = min(5.0, services.config.backend_timeout_s)

    @app.get("/healthz", summary="liveness: the gateway process answers")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="readiness: model loaded (and index loaded when one is configured)")
    async def readyz() -> JSONResponse:
        model, index = await asyncio.gather(call(services.embedder.info, timeout=timeout),
                                            call(services.searcher.info, timeout=timeout),
                                            return_exceptions=True)
        body = readiness(model, index)
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics", summary="Prometheus metrics: raybind request counters + Serve's own series")
    async def metrics() -> Response:
        body = await asyncio.to_thread(services.metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4")


def readiness(model: Any, index: Any) -> dict:
    """The unauthenticated readiness body: states and reasons in fixed words. Error details (which
    can name files and hosts) are only in the authenticated /v1/model and the replicas' logs."""
    model_ok = isinstance(model, dict) and model["ready"]
    index_ok = isinstance(index, dict) and (index["ready"] or not index["configured"])
    info = model["model"] if model_ok else None
    summary = index.get("index") if isinstance(index, dict) else None
    return {"ready": bool(model_ok and index_ok),
            "model": {"loaded": bool(model_ok), "name": info and info["name"], "version": info and info["version"],
                      "last_error": model_reason(model)},
            "index": {"configured": bool(isinstance(index, dict) and index["configured"]),
                      "loaded": bool(summary), "rows": summary and summary["rows"],
                      "matches_model": bool(summary and info and index_matches(summary, info)),
                      "last_error": index_reason(index)}}


def model_reason(model: Any) -> str:
    if not isinstance(model, dict):
        return "the Embedder did not answer"
    if model["ready"]:
        return "a model reload failed; still serving the loaded model" if model.get("last_error") else ""
    return "the model failed to load" if model.get("last_error") else "the model is loading"


def index_reason(index: Any) -> str:
    if not isinstance(index, dict):
        return "the Searcher did not answer"
    if not index.get("last_error"):
        return "" if index["ready"] or not index["configured"] else "the index is loading"
    reason = index.get("reason") or "the index could not be loaded"
    return f"an index reload failed ({reason}); still serving the loaded index" if index["ready"] else reason


def index_matches(summary: dict, model: dict) -> bool:
    return summary.get("model_name") == model["name"] and summary.get("model_version") == model["version"]


def add_v1_routes(app: FastAPI, services: Services, auth: Any) -> None:
    limits, timeout = services.config.limits, services.config.backend_timeout_s

    @app.get("/v1/model", dependencies=[auth], summary="the registered model (name, version, alias) being served")
    async def model_info() -> dict:
        model, index = await asyncio.gather(call(services.embedder.info, timeout=timeout),
                                            call(services.searcher.info, timeout=timeout))
        return {**(model["model"] or {}), "last_error": public_text(model["last_error"]),
                "batching": model["batching"], "refresh_s": model["refresh_s"], "index": index["index"]}

    @app.post("/v1/embed", dependencies=[auth], response_model=EmbedOut, responses=ERRORS,
              openapi_extra=openapi.body("EmbedIn", openapi.EMBED_FORM), summary="embed text / image / audio / video")
    async def embed(request: Request) -> JSONResponse:
        items = await embed_items(request, limits)
        count_items(request, items)
        result = await call(services.embedder.embed, items, limits.decode_limits(), timeout=timeout)
        if "errors" in result:
            raise item_error(result["errors"][0])
        emb = np.round(result["embeddings"].astype(np.float64), 7)
        data = [{"index": i, "modality": item.modality, "embedding": row} for i, (item, row) in
                enumerate(zip(items, emb.tolist(), strict=True))]
        return JSONResponse({"model": result["model"], "dimension": int(emb.shape[1]), "data": data})

    @app.post("/v1/zero-shot", dependencies=[auth], response_model=ZeroShotOut, responses=ERRORS,
              openapi_extra=openapi.body("ZeroShotIn", openapi.ZERO_SHOT_FORM),
              summary="rank candidate labels for one item")
    async def zero_shot(request: Request) -> JSONResponse:
        item, opts = await one_item_request(request, limits, ZeroShotIn, ZeroShotOptions, "item", ("labels",))
        count_items(request, [item])
        prompts = zero_shot_prompts(opts, limits)
        result = await call(services.embedder.zero_shot, item, prompts, limits.decode_limits(), timeout=timeout)
        if "errors" in result:
            raise item_error(result["errors"][0])
        ranked = rank_labels(list(opts.labels), result["scores"], result["logit_scale"], opts.top_k)
        return JSONResponse({"model": result["model"], "modality": item.modality, "template": opts.template,
                             "labels": ranked})

    @app.post("/v1/search", dependencies=[auth], response_model=SearchOut, responses=ERRORS,
              openapi_extra=openapi.body("SearchIn", openapi.SEARCH_FORM),
              summary="top-k items of a target modality for a query in any modality")
    async def search(request: Request) -> JSONResponse:
        item, opts = await one_item_request(request, limits, SearchIn, SearchOptions, "query")
        count_items(request, [item])
        return JSONResponse(await run_search(services, item, opts, timeout))


async def run_search(services: Services, item: Item, opts: SearchOptions, timeout: float) -> dict:
    limits = services.config.limits
    if opts.k > limits.max_k:
        raise ApiError(422, "invalid_field", f"k: {opts.k} > limit {limits.max_k}", "k")
    embedded = await call(services.embedder.embed, [item], limits.decode_limits(), timeout=timeout)
    if "errors" in embedded:
        raise item_error(embedded["errors"][0])
    found = await call(services.searcher.search, embedded["embeddings"][0], opts.target, opts.k, timeout=timeout)
    if "error" in found:
        code, message = found["error"]
        status = {"index_not_loaded": 503, "index_model_mismatch": 409, "target_not_indexed": 422}[code]
        raise ApiError(status, code, message, "target" if code == "target_not_indexed" else None)
    model = embedded["model"]
    body = {"model": model, "index": found["index"], "target": opts.target, "k": opts.k,
            "results": [{**hit, "modality": opts.target} for hit in found["results"]]}
    if not index_matches(found["index"], model):
        body["warning"] = (f"the index was built with {found['index']['model_name']} version "
                           f"{found['index']['model_version']}, the served model is {model['name']} version "
                           f"{model['version']}: rebuild the index for meaningful scores")
    return body


class MetricsMiddleware:
    """Counts every request (endpoint, modality, status) and its latency, whatever way it ends."""

    def __init__(self, app: Any, metrics: RequestMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        timer, status = Timer(), [500]

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            path = scope.get("path", "")
            root = scope.get("root_path", "")
            path = path[len(root):] if root and path.startswith(root) else path
            endpoint = path if path in ENDPOINTS else "other"  # bounded label values, whatever the URL
            self.metrics.observe(endpoint, scope.get("raybind.modalities", Tally()), status[0], timer.elapsed())
