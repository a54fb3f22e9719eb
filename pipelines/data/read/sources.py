"""Which shards to read, in which order, from where: URL resolution and the per-epoch plan.

Accepted inputs (local paths or s3:// URLs, alone or in a list):
- a data set folder: its `manifest.json` lists the shards (else `sizes.json`, else every `*.tar`);
- a `manifest.json` or `sizes.json` file;
- a glob (`data/shard-*.tar`) or a brace pattern (`shard-{000000..000099}.tar`);
- a single `.tar` shard.
Sample counts (for skipping and for sizing) come from the folder's `manifest.json` (per-split counts
too) or `sizes.json`, looked up once per folder; without them counts are unknown (None).
A shard that is listed but missing is kept: the read task counts it as `unreadable_shard`.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.core import storage

INDEX_FILES = ("manifest.json", "sizes.json")


@dataclass(frozen=True)
class Shard:
    url: str  # local absolute path or s3://bucket/key
    name: str  # file name, the shard's identity for seeds and stats
    count: int | None = None  # samples in the shard (sizes.json / manifest), None if unknown
    splits: tuple[tuple[str, int], ...] | None = None  # per-split counts from the manifest

    def count_for(self, split: str | None) -> int | None:
        """Samples of `split` in this shard (all samples when split is None); None if unknown."""
        if split is None:
            return self.count
        if self.splits is None:
            return None
        return dict(self.splits).get(split, 0)


def _url_of(fs_path: str, like: str) -> str:
    return f"s3://{fs_path}" if storage.check_scheme(like) == "s3" else fs_path


def _parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


@functools.lru_cache(maxsize=64)
def load_index(folder: str) -> dict:
    """{'counts': {name: n}, 'splits': {name: {split: n}}, 'names': [...]} from the folder's
    manifest.json / sizes.json ({} when neither exists or is readable)."""
    fs, path = storage.filesystem(folder)
    for index in INDEX_FILES:
        try:
            with fs.open(f"{path}/{index}", "rb") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if index == "manifest.json" and isinstance(data.get("shards"), list):
            shards = data["shards"]
            return {"names": [s["name"] for s in shards],
                    "counts": {s["name"]: s.get("count") for s in shards},
                    "splits": {s["name"]: s.get("splits") for s in shards if s.get("splits") is not None}}
        if index == "sizes.json" and isinstance(data, dict):
            return {"names": sorted(data), "counts": dict(data), "splits": {}}
    return {}


def _with_counts(urls: list[str]) -> list[Shard]:
    shards = []
    for url in urls:
        name = url.rstrip("/").rsplit("/", 1)[-1]
        index = load_index(_parent(url))
        splits = index.get("splits", {}).get(name)
        shards.append(Shard(url, name, index.get("counts", {}).get(name),
                            tuple(sorted(splits.items())) if splits is not None else None))
    return shards


def _expand_one(url: str) -> list[str]:
    """One input -> shard URLs (not yet checked for existence when named explicitly)."""
    if "{" in url and ".." in url:
        from braceexpand import braceexpand

        return [u for pattern in braceexpand(url) for u in _expand_one(pattern)]
    fs, path = storage.filesystem(url)
    url = _url_of(path, url)  # absolute: Ray workers may run in another directory
    base = url.rsplit("/", 1)[-1]
    if any(c in path for c in "*?["):
        return sorted(_url_of(p, url) for p in fs.glob(path) if p.endswith(".tar"))
    if base in INDEX_FILES:
        folder = _parent(url)
        return [storage.join(folder, n) for n in load_index(folder).get("names", [])]
    if fs.isdir(path):
        folder = _url_of(path, url)
        names = load_index(folder).get("names")
        if names is None:
            names = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{path}/*.tar"))
        return [storage.join(folder, n) for n in names]
    return [_url_of(path, url)]


def resolve_shards(urls: str | Sequence[str]) -> list[Shard]:
    """Shard list (sorted by URL, duplicates removed) for paths, globs, brace patterns, manifests."""
    inputs = [urls] if isinstance(urls, str) else list(urls)
    if not inputs:
        raise FileNotFoundError("no shard URLs given")
    found: list[str] = []
    for url in inputs:
        storage.check_scheme(str(url))
        found.extend(_expand_one(str(url)))
    if not found:
        raise FileNotFoundError(f"no shards (*.tar) found at {', '.join(map(str, inputs))}")
    return _with_counts(sorted(set(found)))


def allocate_shards(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Shards per split: largest-remainder rounding of n * fraction; then every split with a
    positive fraction gets at least one shard, taken from the largest, while that one keeps one."""
    total = sum(fractions.values())
    exact = {name: n * frac / total for name, frac in fractions.items()}
    alloc = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - alloc[name], reverse=True)
    for name in by_remainder[: n - sum(alloc.values())]:
        alloc[name] += 1
    for name, frac in fractions.items():
        donor = max(alloc, key=alloc.get)
        if frac > 0 and alloc[name] == 0 and alloc[donor] > 1:
            alloc[donor] -= 1
            alloc[name] += 1
    return alloc


def shards_of_split(shards: list[Shard], split: str, fractions: dict[str, float]) -> list[Shard]:
    """Split by shard: in name order, consecutive runs of shards go to the splits in the order of
    `fractions`, sized by allocate_shards."""
    if split not in fractions:
        raise ValueError(f"split {split!r} not in shard_split_fractions {sorted(fractions)}")
    ordered = sorted(shards, key=lambda s: s.name)
    start = 0
    for name, count in allocate_shards(len(ordered), fractions).items():
        if name == split:
            return ordered[start:start + count]
        start += count
    return []


def shard_seed(seed: int, epoch: int, name: str) -> list[int]:
    """Seed for a shard's sample shuffle: depends on (seed, epoch, shard name) only."""
    return [int(seed), int(epoch), zlib.crc32(name.encode())]


def order_shards(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    """The epoch's shard order: name order, or a permutation fixed by (seed, epoch)."""
    ordered = sorted(shards, key=lambda s: s.name)
    if not shuffle:
        return ordered
    perm = np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(len(ordered))
    return [ordered[i] for i in perm]


def plan_skip(shards: list[Shard], skip: int, split: str | None) -> tuple[list[Shard], int]:
    """Drop whole shards covered by the first `skip` samples; return (rest, offset into the first).

    Counts are samples of `split` (before decode failures): the position in the epoch's order."""
    if skip <= 0:
        return shards, 0
    for i, shard in enumerate(shards):
        n = shard.count_for(split)
        if n is None:
            raise ValueError(f"skip_samples needs per-shard sample counts{' per split' if split else ''} "
                             f"(manifest.json / sizes.json); none for {shard.name}")
        if skip < n:
            return shards[i:], skip
        skip -= n
    return [], 0
