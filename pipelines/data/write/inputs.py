"""`raybind data build`'s inputs: a folder of files paired by name, or a table with one row per
sample; and the hashed split. Nothing is read here but names and the table."""

from __future__ import annotations

import hashlib
import io
import math
from typing import Any

from pipelines.core import storage
from pipelines.core.config import ConfigError
from pipelines.data.write.build_config import FOLDER_EXTS, MEDIA, BuildConfig, Entry, failure


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


