"""Write webdataset shards the way img2dataset / video2dataset do: one tar per shard, zero-padded
keys, a `_stats.json` per shard, and `sizes.json` + `manifest.json` for the data set.

A shard is written under a temporary name and renamed when complete (on S3 a PUT is atomic, so the
object appears only once whole); the manifest is written last, so a data set with a manifest is a
complete data set. A failed write removes its temporary files and leaves nothing half-written.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from collections import Counter
from collections.abc import Iterable

from pipelines.core import storage

MODALITY_OF_EXT = {
    "jpg": "image", "jpeg": "image", "png": "image", "webp": "image",
    "txt": "text",
    "wav": "audio", "flac": "audio", "mp3": "audio", "m4a": "audio", "ogg": "audio",
    "mp4": "video", "webm": "video", "mkv": "video",
}


class OutputError(ValueError):
    """The output location cannot be used (scheme, not empty, not writable)."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def tar_bytes(samples: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    """A tar of `KEY.EXT` members, with fixed metadata so equal inputs give identical bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(members[ext])
                info.mtime, info.mode, info.uname, info.gname = 0, 0o644, "raybind", "raybind"
                tar.addfile(info, io.BytesIO(members[ext]))
    return buf.getvalue()


def shard_stats(name: str, samples: list[tuple[str, dict[str, bytes]]], failures: Counter) -> dict:
    modalities: Counter = Counter()
    splits: Counter = Counter()
    for _, members in samples:
        modalities.update({MODALITY_OF_EXT[ext] for ext in members if ext in MODALITY_OF_EXT})
        if "json" in members:
            splits[json.loads(members["json"]).get("split", "unknown")] += 1
    return {
        "shard": name, "count": len(samples), "successes": len(samples),
        "failed_to_write": sum(failures.values()), "failures": dict(failures),
        "modalities": dict(sorted(modalities.items())), "splits": dict(sorted(splits.items())),
    }


def put_atomic(url: str, data: bytes) -> None:
    """Write `data` to `url` so that readers never see a partial file."""
    fs, path = storage.filesystem(url)
    if storage.check_scheme(url) == "s3":
        with fs.open(path, "wb") as f:  # a single PUT / multipart completes atomically
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_shard(out: str, index: int, samples: list[tuple[str, dict[str, bytes]]],
                failures: Counter | None = None) -> dict:
    name = shard_name(index)
    stats = shard_stats(name, samples, failures or Counter())
    put_atomic(storage.join(out, name), tar_bytes(samples))
    put_atomic(storage.join(out, name.replace(".tar", "_stats.json")),
               json.dumps(stats, indent=1).encode())
    return stats


def prepare_output(out: str, overwrite: bool) -> None:
    """Fail early (OutputError) if `out` has an unsupported scheme, is non-empty, or is not writable."""
    try:
        storage.check_scheme(out)
    except ValueError as exc:
        raise OutputError(str(exc)) from None
    fs, path = storage.filesystem(out)
    try:
        exists = fs.exists(path)
        if exists and not fs.isdir(path):
            raise OutputError(f"{out}: exists and is not a directory")
        if exists and fs.ls(path) and not overwrite:
            raise OutputError(f"{out}: output exists and is not empty; pass --overwrite to replace it")
        if exists and overwrite:
            for entry in fs.ls(path):
                fs.rm(entry, recursive=True)
        fs.makedirs(path, exist_ok=True)
        probe = storage.join(out, f".write-probe-{uuid.uuid4().hex[:8]}")
        put_atomic(probe, b"ok")
        fs.rm(storage.filesystem(probe)[1])
    except OutputError:
        raise
    except (OSError, PermissionError) as exc:
        raise OutputError(f"{out}: not writable ({exc.__class__.__name__}: {exc})") from None


def write_dataset_index(out: str, shard_stats_list: list[dict], manifest: dict) -> dict:
    """`sizes.json` and `manifest.json` (last: its presence marks a complete data set)."""
    shard_stats_list = sorted(shard_stats_list, key=lambda s: s["shard"])
    sizes = {s["shard"]: s["count"] for s in shard_stats_list}
    modalities: Counter = Counter()
    splits: Counter = Counter()
    for s in shard_stats_list:
        modalities.update(s["modalities"])
        splits.update(s["splits"])
    manifest = {
        "format": "raybind-shards/1",
        **manifest,
        "num_samples": sum(sizes.values()),
        "num_shards": len(sizes),
        "modalities": dict(sorted(modalities.items())),
        "splits": dict(sorted(splits.items())),
        "shards": [{"name": s["shard"], "count": s["count"], "splits": s["splits"]} for s in shard_stats_list],
    }
    put_atomic(storage.join(out, "sizes.json"), json.dumps(sizes, indent=1).encode())
    put_atomic(storage.join(out, "manifest.json"), json.dumps(manifest, indent=1).encode())
    return manifest


def remove_partial(out: str) -> None:
    """After a failed write: drop temporary files and shards of an incomplete data set."""
    fs, path = storage.filesystem(out)
    if not fs.exists(path):
        return
    for entry in fs.ls(path, detail=False):
        base = entry.rsplit("/", 1)[-1]
        if ".tmp-" in base or base.startswith("shard-") or base in ("sizes.json", "manifest.json"):
            fs.rm(entry)
