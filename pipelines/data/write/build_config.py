"""`raybind data build`'s config and what every step of it shares: an input sample (`Entry`) and
the failure record written to failures.jsonl."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from models.decode import (
    DecodeLimits,
)
from models.spec import MODALITIES
from pipelines.core.config import require

MEDIA = tuple(m for m in MODALITIES if m != "text")
# Folder pairing: extensions per modality, in order of preference when a stem has several.
FOLDER_EXTS: dict[str, tuple[str, ...]] = {
    "image": ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "svg"),
    "text": ("txt",),
    "audio": ("wav", "flac", "ogg", "mp3", "m4a", "opus", "aac"),
    "video": ("mp4", "webm", "mkv", "mov", "avi"),
    "meta": ("json",),
}
TABLE_SUFFIXES = (".csv", ".parquet", ".jsonl", ".ndjson")
RESERVED = ("key", "source_key", "split", "caption", "modalities", "sources")


@dataclass(frozen=True)
class BuildConfig:
    input: str = ""  # a folder (paired by stem) or a .csv / .parquet / .jsonl table; local or s3://
    out: str = ""  # "" = <work folder>/data/<input name>; s3://bucket/prefix works
    name: str = ""  # data set name in the manifest ("" = the input's name)
    caption_col: str = "caption"
    image_col: str = "image"
    audio_col: str = "audio"
    video_col: str = "video"
    key_col: str = ""  # "" = a `key` column if there is one, else the row's first media path
    split_col: str = ""  # "" = split by a hash of the source key
    meta_cols: tuple[str, ...] = ()  # () = every other column
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.9, "val": 0.05, "test": 0.05})
    split_seed: int = 0
    shard_size: int = 500
    limit: int = 0  # 0 = every input; else the first N (after de-duplication)
    image_max_side: int = 512  # 0 = keep the size
    image_format: Literal["jpg", "png", "webp", "keep"] = "jpg"
    jpeg_quality: int = 90
    audio_rate: int = 0  # 0 = keep; else resample (mono) to this rate
    audio_format: Literal["keep", "flac", "wav"] = "keep"
    video_fps: float = 0.0  # 0 = keep
    video_max_frames: int = 0  # 0 = keep; else at most N frames, sampled uniformly over the clip
    video_max_side: int = 0  # 0 = keep
    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 600.0
    max_video_seconds: float = 600.0
    max_file_bytes: int = 256 * 2**20
    on_error: Literal["skip_sample", "drop_modality"] = "skip_sample"
    overwrite: bool = False

    def __post_init__(self):
        require(self.shard_size > 0, "shard_size", f"must be > 0, got {self.shard_size}")
        require(self.limit >= 0, "limit", "must be >= 0 (0 = all)")
        require(bool(self.splits) and all(v >= 0 for v in self.splits.values()), "splits",
                "must map split names to fractions >= 0")
        require(abs(sum(self.splits.values()) - 1.0) < 1e-6, "splits",
                f"fractions must add up to 1, got {sum(self.splits.values())}")
        require(self.image_max_side >= 0 and self.video_max_side >= 0, "image_max_side/video_max_side", "must be >= 0")
        require(1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be in [1, 100]")
        require(self.audio_rate >= 0 and self.video_fps >= 0 and self.video_max_frames >= 0,
                "audio_rate/video_fps/video_max_frames", "must be >= 0 (0 = keep)")

    @property
    def is_table(self) -> bool:
        return self.input.lower().endswith(TABLE_SUFFIXES)

    @property
    def limits(self):
        return DecodeLimits(max_image_pixels=self.max_image_pixels, max_audio_seconds=self.max_audio_seconds,
                            max_video_seconds=self.max_video_seconds, max_member_bytes=self.max_file_bytes)


@dataclass
class Entry:
    """One input sample before any media is read: where its members come from."""

    source_key: str
    files: dict[str, str] = field(default_factory=dict)  # modality -> path / URL ("text": a .txt file)
    caption: str | None = None  # from a table column (folders: the .txt file)
    meta: dict[str, Any] = field(default_factory=dict)
    meta_file: str | None = None  # folder: the stem's .json


def failure(entry: Entry | None, reason: str, detail: str = "", modality: str | None = None,
            path: str | None = None, action: str = "skipped_sample", key: str | None = None) -> dict:
    return {"key": key, "source_key": entry.source_key if entry else None, "modality": modality,
            "path": path, "reason": reason, "detail": detail[:500], "action": action}


