"""`raybind data inspect PATH`: read a data set through the reader and say what is in it.

Counts come from two places and the report keeps them apart: what the index (manifest.json /
sizes.json) promises, and what actually decoded (good samples per modality, skipped per reason).
`out_png` writes a contact sheet: one row per sample, its image then its video frames.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from typing import Any

import numpy as np

from models.decode import denormalize_pixels
from models.spec import MODALITIES, InputSpec
from pipelines.core import storage
from pipelines.data.read.reader import ReaderConfig, ReadStats, read_shards
from pipelines.data.read.sources import resolve_shards

SHEET_ROWS = 8
TILE = 64


def read_manifest(folder: str) -> dict:
    """The folder's manifest.json ({} if absent or unreadable)."""
    fs, path = storage.filesystem(folder)
    try:
        with fs.open(f"{path}/manifest.json", "rb") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def index_summary(path: str) -> dict[str, Any]:
    """What the index files say, without reading any shard."""
    shards = resolve_shards(path)
    counts = [s.count for s in shards]
    manifest = read_manifest(shards[0].url.rsplit("/", 1)[0])
    return {
        "shards": len(shards),
        "index": "manifest.json" if manifest else ("sizes.json" if None not in counts else None),
        "samples_indexed": None if None in counts else sum(counts),
        "modalities_indexed": manifest.get("modalities"),
        "splits_indexed": manifest.get("splits"),
    }


def _keep_for_sheet(batch: dict, sheet: list[dict], spec: InputSpec) -> None:
    for i in range(len(batch["key"])):
        if len(sheet) >= SHEET_ROWS:
            return
        row = {"caption": str(batch["caption"][i])}
        for m in ("image", "video"):
            if m in batch and batch[f"{m}_mask"][i]:
                row[m] = np.array(batch[m][i])
        if len(row) > 1:
            sheet.append(row)


def inspect_dataset(path: str, limit: int | None = None, out_png: str | None = None,
                    spec: InputSpec | None = None) -> dict[str, Any]:
    """Report (JSON-able dict) on the data set at `path` (folder, glob, brace pattern, manifest,
    s3:// URL), decoding at most `limit` samples (all when None)."""

    spec = spec or InputSpec()
    start = time.perf_counter()
    report: dict[str, Any] = {"job": "data inspect", "path": str(path), **index_summary(path)}
    stats = ReadStats()
    cfg = ReaderConfig(shuffle_shards=False, shuffle_window=0, max_failure_fraction=1.0,
                       label_fields=("split",))
    ds = read_shards(path, config=cfg, spec=spec, stats=stats)
    if limit is not None:
        ds = ds.limit(limit)
    splits: Counter = Counter()
    sheet: list[dict] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        splits.update(str(s) for s in batch["split"])
        if out_png:
            _keep_for_sheet(batch, sheet, spec)
    snap = stats.snapshot()
    report.update({
        "limit": limit,
        "samples_read": snap["samples_good"] + snap["samples_skipped"],
        "samples_good": snap["samples_good"],
        "modalities_present": [m for m in MODALITIES if snap["good_per_modality"].get(m)],
        "good_per_modality": snap["good_per_modality"],
        "skipped": snap["skipped"],
        "dropped": snap["dropped"],
        "failure_fraction": round(snap["failure_fraction"], 4),
        "bytes_per_modality": snap["bytes_per_modality"],
        "splits_read": dict(sorted(splits.items())),
        "shard_errors": snap["shard_errors"],
        "contact_sheet": write_contact_sheet(sheet, out_png) if out_png else None,
        "seconds": round(time.perf_counter() - start, 2),
    })
    return report


def _tile(chw: np.ndarray):
    from PIL import Image

    return Image.fromarray(denormalize_pixels(chw)).resize((TILE, TILE), Image.Resampling.NEAREST)


def write_contact_sheet(rows: list[dict], out_png: str) -> str:
    """One row per sample: image, then its video frames, caption underneath. Returns the path."""
    from PIL import Image, ImageDraw

    cols = 1 + max((len(r["video"]) for r in rows if "video" in r), default=0)
    line = 12
    sheet = Image.new("RGB", (max(cols * TILE, 320), max(len(rows), 1) * (TILE + line)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for y, row in enumerate(rows):
        top = y * (TILE + line)
        if "image" in row:
            sheet.paste(_tile(row["image"]), (0, top))
        for x, frame in enumerate(row.get("video", [])):
            sheet.paste(_tile(frame), ((x + 1) * TILE, top))
        draw.text((2, top + TILE), row["caption"][:80], fill=(0, 0, 0))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    fs, fs_path = storage.filesystem(out_png)
    with fs.open(fs_path, "wb") as f:
        f.write(buf.getvalue())
    return str(out_png)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def format_report(report: dict[str, Any]) -> str:
    """A readable text rendering (rich tables) of inspect_dataset's report."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=io.StringIO(), width=100, force_terminal=False, color_system=None)
    head = Table(title=f"data set {report['path']}", show_header=False)
    for key in ("shards", "index", "samples_indexed", "samples_read", "samples_good", "failure_fraction",
                "splits_indexed", "splits_read", "contact_sheet", "seconds"):
        value = report.get(key)
        head.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    console.print(head)
    mods = Table(title="modalities")
    for col in ("modality", "indexed", "good", "bytes"):
        mods.add_column(col, justify="left" if col == "modality" else "right")
    indexed = report.get("modalities_indexed") or {}
    for m in MODALITIES:
        mods.add_row(m, str(indexed.get(m, "-")), str(report["good_per_modality"].get(m, 0)),
                     _mib(report["bytes_per_modality"].get(m)))
    console.print(mods)
    skipped = Table(title="skipped samples")
    skipped.add_column("reason")
    skipped.add_column("samples", justify="right")
    for reason, n in sorted(report["skipped"].items(), key=lambda kv: -kv[1]) or [("(none)", 0)]:
        skipped.add_row(reason, str(n))
    for reason, n in report.get("dropped", {}).items():
        skipped.add_row(f"dropped {reason}", str(n))
    console.print(skipped)
    for shard, error in report.get("shard_errors", {}).items():
        console.print(f"shard {shard}: {error}")
    return console.file.getvalue()
