"""`raybind data build`: a folder or a table of media files + captions -> shards, in parallel on Ray.

The output follows the ShapesWorld conventions (docs/architecture.md, written by shard_writer):
`shard-NNNNNN.tar` with members `KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`, `KEY.wav|flac|ogg|...`,
`KEY.mp4|webm|mkv`, a `_stats.json` per shard, `sizes.json`, `manifest.json` (written last), and
`failures.jsonl`: one line per input that was skipped or ignored, with its reason.

Inputs
- A folder (local or s3://): files are paired by their path without extension (`a/cat.jpg`,
  `a/cat.txt`, `a/cat.wav` -> one sample whose source key is `a/cat`); `.txt` is the caption, `.json`
  extra metadata. Files of other extensions are ignored (counted in the summary).
- A table (.csv, .parquet, .jsonl): one row per sample; `image_col` / `audio_col` / `video_col` hold
  paths (relative to the table's folder, absolute, or s3:// URLs), `caption_col` the caption, every
  other column (or `meta_cols`) goes into `KEY.json`. Source key: `key_col`, else a `key` column,
  else the row's first media path.

Rules
- Duplicate keys: the FIRST occurrence wins (table row order; folder: the extension listed first in
  FOLDER_EXTS for that modality, e.g. `cat.png` before `cat.svg`); the others are listed in
  failures.jsonl with reason `duplicate_key` and action `ignored`.
- KEY is the zero-padded position of the sample among the de-duplicated inputs (img2dataset style):
  stable for a given input, with gaps where inputs failed; `KEY.json` keeps `source_key`.
- Split: `split_col` when given (a table column, or a field of the folder's `.json`), else from a
  hash of (split_seed, source key) over `splits` fractions: deterministic, independent of worker
  count and input order, and a sample keeps its split when the input grows.
- Validation / re-encoding: every media file is fully decoded. Images: to RGB, longer side capped at
  `image_max_side`, re-encoded as `image_format` (svg is rendered with cairosvg when it is installed).
  Audio: kept as is unless `audio_rate` / `audio_format` ask otherwise (then mono, resampled, flac/wav).
  Video: kept unless `video_fps` / `video_max_frames` / `video_max_side` ask otherwise (then H.264 mp4).
- Failures are never fatal: a missing or unreadable file, or media that does not decode, skips the
  sample (`on_error: skip_sample`) or only that modality (`drop_modality`); a sample left without any
  image / audio / video is skipped (`no_media`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from models.decode import (
    AUDIO_EXTS,
    VIDEO_EXTS,
    DecodeError,
    DecodeLimits,
    decode_video,
    frame_indices,
    open_container,
    resample,
    to_rgb,
)
from models.spec import InputSpec
from pipelines.core import storage, workspace
from pipelines.core.config import ConfigError, require
from pipelines.core.ray_runtime import ensure_ray
from pipelines.data.write import writer as shard_writer
from pipelines.data.write.media import encode_audio as write_audio
from pipelines.data.write.media import encode_mp4

MEDIA = ("image", "audio", "video")
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


# ----------------------------------------------------------------------------- inputs: folders
def scan_folder(root: str) -> tuple[list[Entry], list[dict], int]:
    """Pair files by stem. Returns (entries in path order, duplicate failures, ignored file count)."""
    fs, base = storage.filesystem(root)
    if not fs.isdir(base):
        raise FileNotFoundError(f"input: {root} is not a folder (nor a .csv / .parquet / .jsonl table)")
    kind_of = {ext: kind for kind, exts in FOLDER_EXTS.items() for ext in exts}
    groups: dict[str, dict[str, list[str]]] = {}
    ignored = 0
    for path in sorted(fs.find(base)):
        rel = path[len(base):].lstrip("/")
        stem, dot, ext = rel.rpartition(".")
        kind = kind_of.get(ext.lower()) if dot else None
        if kind is None or rel.rsplit("/", 1)[-1].startswith("."):
            ignored += 1
            continue
        groups.setdefault(stem, {}).setdefault(kind, []).append(_url(root, path))
    entries, dups = [], []
    for stem in sorted(groups):
        entry = Entry(source_key=stem)
        for kind, paths in groups[stem].items():
            paths.sort(key=lambda p: FOLDER_EXTS[kind].index(p.rsplit(".", 1)[-1].lower()))
            dups += [failure(entry, "duplicate_key", f"{stem} already has {paths[0]}", kind, p, "ignored")
                     for p in paths[1:]]
            if kind == "meta":
                entry.meta_file = paths[0]
            else:
                entry.files[kind] = paths[0]
        entries.append(entry)
    return entries, dups, ignored


def _url(root: str, fs_path: str) -> str:
    return f"s3://{fs_path}" if storage.check_scheme(root) == "s3" else fs_path


# ----------------------------------------------------------------------------- inputs: tables
def read_table(url: str):
    """A pandas DataFrame from a local or s3:// .csv / .parquet / .jsonl file."""
    import pandas as pd

    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"input: {url} does not exist")
    with fs.open(path, "rb") as f:
        data = io.BytesIO(f.read())
    lower = url.lower()
    if lower.endswith(".csv"):
        return pd.read_csv(data)
    if lower.endswith(".parquet"):
        return pd.read_parquet(data)
    return pd.read_json(data, lines=True)


def table_columns(cfg: BuildConfig, columns: list[str]) -> dict[str, str]:
    """Role -> column name for the roles the table has; fails early naming what is missing."""
    roles = {"image": cfg.image_col, "audio": cfg.audio_col, "video": cfg.video_col, "caption": cfg.caption_col}
    found = {role: col for role, col in roles.items() if col and col in columns}
    if not any(role in found for role in MEDIA):
        raise ConfigError(f"input: {cfg.input} has none of the media columns "
                          f"{[cfg.image_col, cfg.audio_col, cfg.video_col]}; its columns: {columns} "
                          "(set --image-col / --audio-col / --video-col)")
    for role, col in (("key", cfg.key_col), ("split", cfg.split_col)):
        if col and col not in columns:
            raise ConfigError(f"{role}_col: column {col!r} is not in {cfg.input}; its columns: {columns}")
    missing = [c for c in cfg.meta_cols if c not in columns]
    if missing:
        raise ConfigError(f"meta_cols: {missing} not in {cfg.input}; its columns: {columns}")
    key = cfg.key_col or ("key" if "key" in columns else "")
    if key:
        found["key"] = key
    if cfg.split_col:
        found["split"] = cfg.split_col
    return found


def json_value(value: Any) -> Any:
    """A table cell -> a JSON-safe value (NaN / NaT -> None, numpy scalars and arrays -> Python)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return None if str(value) in ("NaT", "<NA>") else str(value)


def _cell(value: Any) -> str:
    value = json_value(value)
    return "" if value is None else str(value).strip()


def resolve_path(table_url: str, value: str) -> str:
    """A path from a table cell: URLs and absolute paths as they are, others relative to the table."""
    if "://" in value or value.startswith("/"):
        return value
    return storage.join(table_url.rsplit("/", 1)[0] if "/" in table_url else ".", value)


def scan_table(cfg: BuildConfig) -> tuple[list[Entry], list[dict]]:
    """One entry per row (first row of each key wins). Returns (entries, duplicate failures)."""
    df = read_table(cfg.input)
    cols = table_columns(cfg, [str(c) for c in df.columns])
    table_url = cfg.input if storage.check_scheme(cfg.input) == "s3" else storage.filesystem(cfg.input)[1]
    used = set(cols.values())
    meta_cols = list(cfg.meta_cols) or [str(c) for c in df.columns if str(c) not in used]
    entries, dups, seen = [], [], set()
    for row in df.to_dict("records"):
        files = {m: resolve_path(table_url, _cell(row[cols[m]])) for m in MEDIA if m in cols and _cell(row[cols[m]])}
        key = _cell(row[cols["key"]]) if "key" in cols else next(iter(files.values()), "")
        caption = _cell(row[cols["caption"]]) if "caption" in cols else None
        meta = {c: json_value(row[c]) for c in meta_cols}
        if "split" in cols:
            meta["__split__"] = _cell(row[cols["split"]])
        entry = Entry(source_key=key or f"row-{len(entries) + len(dups)}", files=files, caption=caption, meta=meta)
        if key and key in seen:
            dups.append(failure(entry, "duplicate_key", f"an earlier row has key {key!r}", action="ignored"))
            continue
        seen.add(key)
        entries.append(entry)
    return entries, dups


# ----------------------------------------------------------------------------- splits
def hashed_split(source_key: str, splits: dict[str, float], seed: int = 0) -> str:
    """Deterministic split from sha256(seed, key): the same key always lands in the same split."""
    digest = hashlib.sha256(f"{seed}:{source_key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    total = 0.0
    for name, fraction in splits.items():
        total += fraction
        if u < total:
            return name
    return list(splits)[-1]


# ----------------------------------------------------------------------------- media: images
def render_svg(data: bytes, max_side: int):
    """SVG -> RGBA PIL image, rendered (not resized) so its longer side is `max_side`."""
    from PIL import Image


    try:
        import cairosvg
    except (ImportError, OSError) as exc:  # OSError: the system cairo library is missing
        raise DecodeError("svg_unsupported", f"install cairosvg (and the cairo library) to read svg: {exc}") from None
    try:
        im = Image.open(io.BytesIO(cairosvg.svg2png(bytestring=data)))
        if max_side and max(im.size) != max_side:
            scale = max_side / max(im.size)
            im = Image.open(io.BytesIO(cairosvg.svg2png(bytestring=data, scale=scale)))
        im.load()
    except Exception as exc:  # cairosvg raises many kinds (XML, ValueError, ...)
        raise DecodeError("corrupt_image", f"svg: {type(exc).__name__}: {exc}") from None
    return im


def open_image(data: bytes, ext: str, cfg: BuildConfig):
    """A fully decoded PIL image; DecodeError with the decoder's reason codes otherwise."""
    import warnings

    from PIL import Image


    if ext == "svg":
        return render_svg(data, cfg.image_max_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        if im.size[0] * im.size[1] > cfg.max_image_pixels:
            raise DecodeError("too_many_pixels", f"{im.size[0]}x{im.size[1]} > {cfg.max_image_pixels} pixels")
        im.load()
    except DecodeError:
        raise
    except Exception as exc:  # PIL: OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise DecodeError("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    return im


def encode_image(data: bytes, ext: str, cfg: BuildConfig) -> tuple[str, bytes]:
    """Validate, cap the longer side, re-encode. Returns (member extension, bytes)."""
    from PIL import Image


    im = open_image(data, ext, cfg)
    too_big = cfg.image_max_side and max(im.size) > cfg.image_max_side
    if cfg.image_format == "keep" and not too_big and ext in ("jpg", "jpeg", "png", "webp"):
        return ("jpg" if ext == "jpeg" else ext), data  # decoded fine and nothing to change: copy bytes
    fmt = cfg.image_format if cfg.image_format != "keep" else ("jpg" if ext == "jpeg" else ext)
    fmt = fmt if fmt in ("jpg", "png", "webp") else "png"
    im = to_rgb(im)  # alpha composited on white, as the decoder does
    if too_big:
        im.thumbnail((cfg.image_max_side, cfg.image_max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], quality=cfg.jpeg_quality)
    return fmt, buf.getvalue()


# ----------------------------------------------------------------------------- media: audio
def read_audio(data: bytes, ext: str, cfg: BuildConfig):
    """The whole recording as float32 (frames, channels) and its rate (soundfile, then PyAV)."""
    import numpy as np


    errors = []
    for reader in (_soundfile_audio, _pyav_audio):
        try:
            wave, rate = reader(data, ext)
        except Exception as exc:  # soundfile: LibsndfileError; av: av.error.*
            errors.append(f"{reader.__name__}: {type(exc).__name__}: {exc}")
            continue
        if wave.size == 0 or not rate:
            errors.append(f"{reader.__name__}: no samples")
            continue
        if wave.shape[0] / rate > cfg.max_audio_seconds:
            raise DecodeError("audio_too_long", f"{wave.shape[0] / rate:.1f} s > {cfg.max_audio_seconds} s")
        return np.asarray(wave, np.float32), int(rate)
    raise DecodeError("corrupt_audio", "; ".join(errors))


def _soundfile_audio(data: bytes, ext: str):
    import soundfile as sf

    wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return wave, rate


def _pyav_audio(data: bytes, ext: str):
    import numpy as np


    with open_container(data, ext) as container:
        stream = container.streams.audio[0]
        chunks = [frame.to_ndarray().astype(np.float32) for frame in container.decode(stream)]
        rate = stream.rate
    planar = [c if c.shape[0] == stream.channels else c.reshape(-1, stream.channels).T for c in chunks]
    return (np.concatenate(planar, axis=1).T if planar else np.zeros((0, 1), np.float32)), rate


def encode_audio(data: bytes, ext: str, cfg: BuildConfig) -> tuple[str, bytes]:
    """Validate by decoding it all; re-encode (mono, `audio_rate`, flac/wav) only when asked."""

    wave, rate = read_audio(data, ext, cfg)
    if not cfg.audio_rate and cfg.audio_format == "keep" and ext in AUDIO_EXTS:
        return ext, data
    mono = wave.mean(axis=1)
    target = cfg.audio_rate or rate
    fmt = cfg.audio_format if cfg.audio_format != "keep" else "flac"
    return fmt, write_audio(resample(mono, rate, target), target, fmt)


# ----------------------------------------------------------------------------- media: video
def encode_video(data: bytes, ext: str, cfg: BuildConfig) -> tuple[str, bytes]:
    """Validate with the reader's decoder; re-encode to H.264 mp4 only when fps / frames / size are set."""

    decode_video(data, ext, InputSpec(video_frames=2, video_size=16), cfg.limits)  # reason codes on failure
    if not (cfg.video_fps or cfg.video_max_frames or cfg.video_max_side) and ext in VIDEO_EXTS:
        return ext, data
    frames, fps = read_frames(data, ext, cfg)

    return "mp4", encode_mp4(frames, max(1, round(fps)))


def read_frames(data: bytes, ext: str, cfg: BuildConfig):
    """RGB PIL frames resampled to `video_fps`, capped to `video_max_frames` (uniformly) and
    `video_max_side` (even sizes, as H.264 wants); returns (frames, frames per second)."""

    with open_container(data, ext) as container:
        stream = container.streams.video[0]
        native = float(stream.average_rate or 25)
        step = 1.0 / cfg.video_fps if cfg.video_fps else 0.0
        frames, next_t = [], 0.0
        for i, frame in enumerate(container.decode(stream)):
            t = frame.time if frame.time is not None else i / native
            if step and t + 1e-6 < next_t:
                continue
            next_t += step
            frames.append(frame.to_image())
    fps = cfg.video_fps or native
    duration = len(frames) / fps
    if cfg.video_max_frames and len(frames) > cfg.video_max_frames:
        frames = [frames[i] for i in frame_indices(len(frames), cfg.video_max_frames)]
        fps = len(frames) / duration
    return [_fit(f, cfg.video_max_side) for f in frames], fps


def _fit(im, max_side: int):
    from PIL import Image

    w, h = im.size
    scale = min(1.0, max_side / max(w, h)) if max_side else 1.0
    size = (max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2))
    return im if size == im.size else im.resize(size, Image.Resampling.BICUBIC)


ENCODERS = {"image": encode_image, "audio": encode_audio, "video": encode_video}


# ----------------------------------------------------------------------------- one sample, one shard
def read_file(url: str, max_bytes: int) -> bytes:
    """The file's bytes; DecodeError missing_file / too_large / unreadable_file / empty otherwise."""

    fs, path = storage.filesystem(url)
    try:
        if not fs.exists(path):
            raise DecodeError("missing_file", f"{url} does not exist")
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise DecodeError("too_large", f"{url}: {size} bytes > {max_bytes}")
        data = fs.cat_file(path)
    except DecodeError:
        raise
    except OSError as exc:  # permissions, a folder named like a file, a network error
        raise DecodeError("unreadable_file", f"{url}: {type(exc).__name__}: {exc}") from None
    if not data:
        raise DecodeError("empty", f"{url} is empty")
    return data


def _extension(url: str) -> str:
    name = url.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def encode_member(modality: str, url: str, cfg: BuildConfig) -> tuple[str, bytes]:
    """Read one source file and turn it into a shard member (extension, bytes)."""

    data = read_file(url, cfg.max_file_bytes)
    if modality == "text":
        return "txt", data.decode("utf-8", errors="replace").strip().encode()
    if modality == "meta":
        try:
            meta = json.loads(data)
        except ValueError as exc:
            raise DecodeError("corrupt_json", str(exc)) from None
        if not isinstance(meta, dict):
            raise DecodeError("corrupt_json", f"expected an object, got {type(meta).__name__}")
        return "json", data
    return ENCODERS[modality](data, _extension(url), cfg)


def sample_members(entry: Entry, key: str, cfg: BuildConfig) -> tuple[dict[str, bytes] | None, list[dict]]:
    """All members of one sample, or None (skipped) with the failures that caused it."""

    sources = dict(entry.files)
    if entry.meta_file:
        sources["meta"] = entry.meta_file
    members: dict[str, bytes] = {}
    fails: list[dict] = []
    for modality, url in sources.items():
        try:
            ext, data = encode_member(modality, url, cfg)
        except DecodeError as exc:
            action = "dropped_modality" if cfg.on_error == "drop_modality" else "skipped_sample"
            fails.append(failure(entry, exc.reason, exc.detail, modality, url, action, key))
            if action == "skipped_sample":
                return None, fails
            continue
        members[ext] = data
    if not any(shard_writer.MODALITY_OF_EXT.get(ext) in MEDIA for ext in members):
        fails.append(failure(entry, "no_media", "no readable image, audio or video", key=key))
        return None, fails
    return finish_sample(entry, key, members, cfg), fails


def finish_sample(entry: Entry, key: str, members: dict[str, bytes], cfg: BuildConfig) -> dict[str, bytes]:
    """Caption member and KEY.json: key, source_key, split, caption, modalities, + metadata."""
    meta = dict(entry.meta)
    meta.update(json.loads(members.pop("json")) if "json" in members else {})
    caption = members.pop("txt").decode() if "txt" in members else (entry.caption or "")
    split = str(meta.pop("__split__", "") or (meta.get(cfg.split_col) if cfg.split_col else "") or "")
    split = split or hashed_split(entry.source_key, cfg.splits, cfg.split_seed)
    if caption:
        members["txt"] = caption.encode()
    modalities = sorted({shard_writer.MODALITY_OF_EXT[e] for e in members if e in shard_writer.MODALITY_OF_EXT})
    record = {"key": key, "source_key": entry.source_key, "split": split, "caption": caption,
              "modalities": modalities}
    # Extra fields sit at the top level, like ShapesWorld's attributes (the reader's label_fields).
    record.update({(f"meta_{k}" if k in RESERVED else k): v for k, v in meta.items()})
    members["json"] = json.dumps(record, ensure_ascii=False, default=str).encode()
    return members


def build_shard(cfg: BuildConfig, shard_index: int, first: int, entries: list[Entry]) -> dict:
    """Build and write one shard (a pure function of its inputs); returns its stats and failures."""
    samples, fails = [], []
    for offset, entry in enumerate(entries):
        key = f"{first + offset:09d}"
        members, sample_fails = sample_members(entry, key, cfg)
        fails.extend(sample_fails)
        if members is not None:
            samples.append((key, members))
    if not samples:  # nothing readable: no empty tar, the failures say why
        return {"stats": None, "failures": fails}
    skipped = Counter(f["reason"] for f in fails if f["action"] == "skipped_sample")
    return {"stats": shard_writer.write_shard(cfg.out, shard_index, samples, skipped), "failures": fails}


# ----------------------------------------------------------------------------- the job
def scan_inputs(cfg: BuildConfig) -> tuple[list[Entry], list[dict], int]:
    """(entries, failures found while pairing, ignored files); nothing is read but names / the table."""
    if cfg.is_table:
        entries, dups = scan_table(cfg)
        return entries, dups, 0
    return scan_folder(cfg.input)


def _run_tasks(cfg: BuildConfig, entries: list[Entry]) -> list[dict]:
    import ray
    from tqdm import tqdm

    env = storage.worker_env()
    task = ray.remote(num_cpus=1, max_retries=2)(build_shard)
    if env:
        task = task.options(runtime_env={"env_vars": env})
    cfg_ref = ray.put(cfg)
    pending = [task.remote(cfg_ref, i, start, entries[start:start + cfg.shard_size])
               for i, start in enumerate(range(0, len(entries), cfg.shard_size))]
    results = []
    with tqdm(total=len(pending), desc="data build shards", unit="shard") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.extend(ray.get(done))
            bar.update(len(done))
    return results


def resolve_paths(cfg: BuildConfig) -> BuildConfig:
    """Absolute input / output locations (Ray workers do not share the driver's cwd) and a name."""

    def absolute(url: str) -> str:
        return url.rstrip("/") if storage.check_scheme(url) == "s3" else storage.filesystem(url)[1]

    source = absolute(cfg.input)
    name = cfg.name or source.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] or "dataset"
    out = absolute(cfg.out or str(workspace.subdir("data") / name))
    return dataclasses.replace(cfg, input=source, out=out, name=name)


def write_failures(out: str, fails: list[dict]) -> str:
    url = storage.join(out, "failures.jsonl")
    lines = "".join(json.dumps(f, ensure_ascii=False, default=str) + "\n" for f in fails)
    shard_writer.put_atomic(url, lines.encode())
    return url


def media_settings(cfg: BuildConfig) -> dict:
    fields = ("image_max_side", "image_format", "audio_rate", "audio_format", "video_fps", "video_max_frames",
              "video_max_side", "on_error")
    return {f: getattr(cfg, f) for f in fields}


def build_dataset(cfg: BuildConfig) -> dict:
    """Write the data set; returns a summary. Bad input / output locations fail before Ray starts."""

    # Checked here, not in __post_init__: the shipped YAML (input: "") must load before --input is given.
    require(bool(cfg.input), "input", "is required: a folder, or a .csv / .parquet / .jsonl table (--input)")
    cfg = resolve_paths(cfg)
    entries, pre_fails, ignored = scan_inputs(cfg)
    entries = entries[:cfg.limit] if cfg.limit else entries
    if not entries:
        raise ValueError(f"input: no samples found in {cfg.input}")
    shard_writer.prepare_output(cfg.out, cfg.overwrite)
    ensure_ray()
    start = time.perf_counter()
    try:
        results = _run_tasks(cfg, entries)
        fails = pre_fails + [f for r in results for f in r["failures"]]
        failures_url = write_failures(cfg.out, fails)
        manifest = shard_writer.write_dataset_index(cfg.out, [r["stats"] for r in results if r["stats"]], {
            "dataset": cfg.name, "source": cfg.input, "inputs": len(entries) + len(pre_fails),
            "split_rule": f"column {cfg.split_col}" if cfg.split_col else f"sha256(split_seed={cfg.split_seed}, source_key)",
            "split_fractions": dict(cfg.splits), "media": media_settings(cfg),
            "failures": {"file": "failures.jsonl", "count": len(fails)},
            "created_by": f"raybind data build --input {cfg.input} --out {cfg.out}",
        })
    except BaseException:
        shard_writer.remove_partial(cfg.out)
        raise
    return {
        "job": "data build", "input": cfg.input, "out": cfg.out, "inputs": len(entries),
        "samples": manifest["num_samples"], "shards": manifest["num_shards"],
        "modalities": manifest["modalities"], "splits": manifest["splits"],
        "failed": dict(Counter(f["reason"] for f in fails)), "ignored_files": ignored,
        "failures": failures_url, "manifest": storage.join(cfg.out, "manifest.json"),
        "seconds": round(time.perf_counter() - start, 2),
    }
