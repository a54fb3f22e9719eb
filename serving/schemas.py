"""Request and response shapes of the HTTP API (pydantic): they validate JSON bodies and document
the routes at /docs. Multipart requests are validated into the same option models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.settings import Modality


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ItemIn(Body):
    """One input. Text: `text`. Media: `data` = base64 of the file's bytes (a `data:` URL works too),
    `format` = its extension (jpg, png, webp / wav, flac, ogg, mp3, m4a / mp4, webm, mkv); without
    `format` the container is recognised from its first bytes."""

    modality: Modality
    text: str | None = None
    data: str | None = None
    format: str | None = None


class EmbedIn(Body):
    items: list[ItemIn] = Field(min_length=1, description="several items per request, any mix of modalities")
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"items": [
        {"modality": "text", "text": "a small red circle moving left"},
        {"modality": "image", "data": "<base64 of a png/jpg>", "format": "png"}]}})


class ZeroShotOptions(Body):
    labels: list[str] = Field(min_length=1, description="candidate labels (at least one)")
    template: str = Field("{}", description="prompt with {} or {label}, e.g. 'a photo of a {} shape'")
    top_k: int | None = Field(None, ge=1, description="return only the best k labels")

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[str]) -> list[str]:
        cleaned = [label.strip() for label in labels]
        if any(not label for label in cleaned):
            raise ValueError("labels must be non-empty strings")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("labels must be unique")
        return cleaned

    @field_validator("template")
    @classmethod
    def _template(cls, template: str) -> str:
        # Plain substitution, never str.format: a user-supplied format string could read attributes.
        if "{}" not in template and "{label}" not in template:
            raise ValueError("template must contain {} or {label}")
        return template


class ZeroShotIn(ZeroShotOptions):
    item: ItemIn
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {
        "item": {"modality": "image", "data": "<base64>", "format": "jpg"},
        "labels": ["red", "green", "blue", "yellow"], "template": "a {} shape"}})


class SearchOptions(Body):
    target: Modality = Field(description="which modality of the index to return")
    k: int = Field(10, ge=1, description="how many results")


class SearchIn(SearchOptions):
    query: ItemIn
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {
        "query": {"modality": "text", "text": "a large blue square"}, "target": "image", "k": 5}})


# ----------------------------------------------------------------------------- responses (docs)
class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str
    uri: str
    run_id: str = ""
    embed_dim: int
    modalities: list[str]
    loaded_at: str
    generation: int


class Embedding(BaseModel):
    index: int
    modality: str
    embedding: list[float]


class EmbedOut(BaseModel):
    model: ModelInfo
    dimension: int
    data: list[Embedding]


class LabelScore(BaseModel):
    label: str
    probability: float
    score: float = Field(description="cosine similarity of the item and the label's prompt")


class ZeroShotOut(BaseModel):
    model: ModelInfo
    modality: str
    template: str
    labels: list[LabelScore]


class Hit(BaseModel):
    rank: int
    key: str
    modality: str
    score: float
    caption: str
    shard: str
    uri: str = Field(description="where the sample lives: the shard URL and key for remote data sets "
                     "(s3://bucket/set/shard-000001.tar#000000040), the location inside the data set for "
                     "local ones (shard-000001.tar#000000040)")
    labels: dict[str, str] = {}


class SearchOut(BaseModel):
    model: ModelInfo
    index: dict
    target: str
    k: int
    results: list[Hit]


class ErrorDetail(BaseModel):
    code: str
    field: str | None
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail
