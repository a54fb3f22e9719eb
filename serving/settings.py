"""Typed settings of the serving application, validated with pydantic (strict: unknown keys fail).

Three owners, matching Serve's config file (`serving/config.yaml`):
- `GatewayConfig`: the application's `args.gateway` (auth, request limits); fixed per deployment.
- `EmbedderConfig`: the `Embedder` deployment's `user_config` (which model, batching); changing it
  reconfigures running replicas in place (no restart, no dropped requests).
- `SearcherConfig`: the `Searcher` deployment's `user_config` (which index, exact or ANN).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.decode import DecodeLimits
from models.spec import MODALITIES

Modality = Literal[MODALITIES]  # type: ignore[valid-type]  # the tuple from models/spec.py


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(Strict):
    """Request limits. Sizes are checked before any decoding; media limits from headers first."""

    max_body_bytes: int = Field(32 * 2**20, ge=1024)  # whole request (413)
    max_items: int = Field(32, ge=1)  # items per /v1/embed request (413)
    max_item_bytes: int = Field(16 * 2**20, ge=1)  # one decoded media item (413)
    max_text_chars: int = Field(2000, ge=1)  # one text item or label (413)
    max_labels: int = Field(128, ge=1)  # zero-shot candidate labels (413)
    max_k: int = Field(100, ge=1)  # search results
    max_image_pixels: int = Field(25_000_000, ge=1)
    max_audio_seconds: float = Field(60.0, gt=0)
    max_video_seconds: float = Field(60.0, gt=0)

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(max_image_pixels=self.max_image_pixels, max_audio_seconds=self.max_audio_seconds,
                            max_video_seconds=self.max_video_seconds, max_member_bytes=self.max_item_bytes)


class GatewayConfig(Strict):
    """Auth, limits and docs of the HTTP ingress.

    The token itself never sits in a config file: it comes from `token_file` (if set; refused when
    readable by group or others) or the environment variable `token_env` of the replica process.

    `interactive_docs` (default false) serves Swagger UI at /docs and ReDoc at /redoc. They are off
    by default because both pages load their JavaScript and CSS from a public CDN: blank on a
    machine without internet access, and third-party code in the browser of whoever opens them.
    The OpenAPI schema they render is always served at /openapi.json (clients and tests read it)."""

    token_env: str = "RAYBIND_SERVE_TOKEN"
    token_file: str = ""
    limits: Limits = Field(default_factory=Limits)
    backend_timeout_s: float = Field(60.0, gt=0)  # a stuck model call becomes 504, never a hung client
    interactive_docs: bool = False


class BatchConfig(Strict):
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)


def default_batching() -> dict[str, BatchConfig]:
    # Media items cost far more to encode than text, so smaller batches keep their latency bounded.
    return {"text": BatchConfig(max_batch_size=64), "image": BatchConfig(max_batch_size=32),
            "audio": BatchConfig(max_batch_size=16), "video": BatchConfig(max_batch_size=8)}


class EmbedderConfig(Strict):
    """`model_uri`: models:/NAME@ALIAS, models:/NAME/VERSION, or a local model folder."""

    model_uri: str = "models:/raybind-shapesworld@champion"
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI of the replica, else MLflow's default
    refresh_s: float = Field(0.0, ge=0)  # > 0: re-resolve an alias this often and swap on change
    torch_threads: int = Field(1, ge=1)  # per replica; replicas scale out instead (2 cores here)
    decode_threads: int = Field(2, ge=1)
    batching: dict[str, BatchConfig] = Field(default_factory=default_batching)

    @model_validator(mode="after")
    def _known_modalities(self) -> EmbedderConfig:
        unknown = sorted(set(self.batching) - set(MODALITIES))
        if unknown:
            raise ValueError(f"batching: unknown modalities {unknown}; choose from {list(MODALITIES)}")
        return self

    def batch(self, modality: str) -> BatchConfig:
        return self.batching.get(modality) or default_batching()[modality]


class SearcherConfig(Strict):
    """`index_path`: a folder written by `raybind index build` ("" = no index: /v1/search is 503)."""

    index_path: str = ""
    ann: Literal["exact", "faiss-hnsw"] = "exact"
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_construction: int = Field(200, ge=8)
    hnsw_ef_search: int = Field(128, ge=8)
    ann_min_rows: int = Field(10_000, ge=0)  # below this an exact scan is faster than any graph


class AppArgs(Strict):
    """The application builder's `args` (serving/app.py:build_app)."""

    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    searcher: SearcherConfig = Field(default_factory=SearcherConfig)
