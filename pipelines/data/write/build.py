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
import json
import time
from collections import Counter

from models.decode import (
    DecodeError,
)
from pipelines.core import storage, workspace
from pipelines.core.config import require
from pipelines.core.ray_runtime import ensure_ray, run_tasks
from pipelines.data.write import writer as shard_writer
from pipelines.data.write.build_config import MEDIA, RESERVED, BuildConfig, Entry, failure
from pipelines.data.write.inputs import hashed_split, scan_folder, scan_table
from pipelines.data.write.transcode import encode_member


# ----------------------------------------------------------------------------- one sample, one shard
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

    cfg_ref = ray.put(cfg)
    calls = [(cfg_ref, i, start, entries[start:start + cfg.shard_size])
             for i, start in enumerate(range(0, len(entries), cfg.shard_size))]
    return run_tasks(build_shard, calls, "data build shards", env=storage.worker_env())


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
