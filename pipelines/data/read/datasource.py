"""A Ray Data datasource that reads webdataset-style tar shards in batches: one read task per shard.

Why not `ray.data.read_webdataset`: it builds one pandas DataFrame per sample and leaves audio and
video undecoded (see benchmarks/results/data_throughput.md). Here a read task streams its tar
(`tarfile` in stream mode over an fsspec file, so S3 is read sequentially, never seeked), groups
members by key, filters the split, shuffles in a bounded window, decodes with `models.decode` straight
into the block's arrays (BlockBuilder), and yields Arrow blocks of `block_rows` samples (numpy tensors
as Arrow tensor columns).

Per-shard failure handling: a shard that cannot be opened is `unreadable_shard`; a tar that fails
before its first member is `corrupt_tar`; one that fails later is `truncated_tar` (the sample being
read is dropped). When sizes.json / the manifest give the shard's count, samples the tar lacks are
counted under that reason too (or `missing_samples` when the tar simply ends early), so the failure
fraction reflects the data that was lost, not just the number of broken files.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from models import decode
from models.spec import InputSpec
from pipelines.core import storage
from pipelines.data.read.config import ReaderConfig, block_rows, bytes_per_sample
from pipelines.data.read.sources import Shard
from pipelines.data.read.stats import ReadStats, Reporter

log = logging.getLogger("raybind.reader")
# webdataset's rule: key = directory + base name up to its first dot; hidden files are not members.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^/.]*)\.([^/]*)$")
_MODALITY_OF_EXT = {ext: m for m, exts in decode.EXTS_OF.items() for ext in exts}
LOGGED_SKIPS_PER_SHARD = 3
READ_BLOCK_BYTES = 4 * 2**20  # fsspec read-ahead: few large sequential GETs on S3


@dataclass
class ShardCounts:
    """One shard's counters; sent cumulatively to the ReadStats actor."""

    seen: int = 0  # samples found in the tar (before the split filter)
    good: int = 0
    filtered: int = 0  # other splits: not a failure
    skipped: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    good_per_modality: Counter = field(default_factory=Counter)
    bytes_per_modality: Counter = field(default_factory=Counter)
    shard_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"good": self.good, "filtered": self.filtered, "skipped": dict(self.skipped),
                "dropped": dict(self.dropped), "good_per_modality": dict(self.good_per_modality),
                "bytes_per_modality": dict(self.bytes_per_modality), "shard_error": self.shard_error}


@dataclass(frozen=True)
class ShardTask:
    """Everything one read task needs: picklable, small."""

    shard: Shard
    epoch: int
    seed: tuple[int, ...]
    offset: int = 0  # samples of the (filtered, shuffled) order to skip without decoding
    # The driver's storage settings (S3 endpoint, credentials) for shards on S3. Set in the worker's
    # environment by the task itself rather than with a Ray runtime_env: a runtime_env starts a
    # separate pool of workers that must import torch / PyAV again (~10 s on a busy 2-core machine).
    storage_env: tuple[tuple[str, str], ...] = ()


def split_name(name: str) -> tuple[str, str] | None:
    """'dir/000000123.mp4' -> ('dir/000000123', 'mp4'); None for names without an extension."""
    m = _KEY_EXT.match(name[2:] if name.startswith("./") else name)
    return (m.group(1), m.group(2).lower()) if m else None


def _shard_failed(counts: ShardCounts, shard: Shard, reason: str, exc: BaseException) -> None:
    counts.shard_error = f"{reason}: {type(exc).__name__}: {exc}"
    log.warning("shard %s: %s", shard.url, counts.shard_error)


def iter_tar_samples(shard: Shard, max_member_bytes: int, counts: ShardCounts) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes}) per sample, streaming. An oversized member is not read: its value is None.
    Errors end the iteration and are recorded in `counts` (see the module docstring)."""
    try:
        fs, path = storage.filesystem(shard.url)
        fileobj = fs.open(path, "rb", block_size=READ_BLOCK_BYTES) if shard.url.startswith("s3://") \
            else fs.open(path, "rb")
    except Exception as exc:  # FileNotFoundError, PermissionError, botocore errors, ...
        _shard_failed(counts, shard, "unreadable_shard", exc)
        return
    key, members = None, {}
    try:
        with fileobj, tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for info in tar:
                parts = split_name(info.name) if info.isfile() else None
                if parts is None:
                    continue
                if parts[0] != key:
                    if members:
                        counts.seen += 1
                        yield key, members
                    key, members = parts[0], {}
                modality = _MODALITY_OF_EXT.get(parts[1], parts[1])
                counts.bytes_per_modality[modality] += info.size
                too_big = info.size > max_member_bytes
                members[parts[1]] = None if too_big else tar.extractfile(info).read()
        if members:
            counts.seen += 1
            yield key, members
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        reason = "corrupt_tar" if key is None else "truncated_tar"
        _shard_failed(counts, shard, reason, exc)
        if members:  # the sample being read when the tar broke is incomplete
            counts.seen += 1
            counts.skipped[reason] += 1


def account_missing(counts: ShardCounts, shard: Shard) -> None:
    """Samples that sizes.json promised but the tar did not hold count as skipped."""
    reason = counts.shard_error.split(":", 1)[0] or "missing_samples"
    expected = shard.count
    if expected is not None and counts.seen < expected:
        counts.skipped[reason] += expected - counts.seen
    elif expected is None and counts.shard_error and counts.seen == 0:
        counts.skipped[reason] += 1  # size unknown: count the broken shard as one lost sample


def window_shuffle(items: Iterator, window: int, rng: np.random.Generator) -> Iterator:
    """Bounded-memory shuffle: keep `window` items, emit a random one as each new one arrives."""
    if window <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < window:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def _skip(counts: ShardCounts, shard: Shard, key: str, reason: str, detail: str = "") -> None:
    counts.skipped[reason] += 1
    if sum(counts.skipped.values()) <= LOGGED_SKIPS_PER_SHARD:
        log.warning("skipped sample %s in %s: %s %s", key, shard.name, reason, detail)


def iter_candidates(task: ShardTask, cfg: ReaderConfig, rng: np.random.Generator,
                    counts: ShardCounts) -> Iterator[tuple[str, dict, dict]]:
    """(key, members, meta) of the split's samples in the epoch's order after the resume offset,
    not decoded yet (skipping and shuffling cost no decode work)."""
    by_field = cfg.split is not None and cfg.split_by == "field"

    def in_split() -> Iterator[tuple[str, dict, dict]]:
        for key, members in iter_tar_samples(task.shard, cfg.limits.max_member_bytes, counts):
            if "json" in members and members["json"] is None:
                _skip(counts, task.shard, key, "too_large", "(json)")
                continue
            try:
                meta = decode.parse_json(members.get("json"))
            except decode.DecodeError as exc:
                _skip(counts, task.shard, key, exc.reason, exc.detail)
                continue
            if by_field and meta.get("split") != cfg.split:
                counts.filtered += 1
                continue
            yield key, members, meta

    for position, item in enumerate(window_shuffle(in_split(), cfg.shuffle_window, rng)):
        if position >= task.offset:
            yield item


def _without_oversized(key: str, members: dict, cfg: ReaderConfig, counts: ShardCounts,
                       shard: Shard) -> dict | None:
    """Members minus those too large to read; None if one of them means the sample is skipped."""
    out = {}
    for ext, data in members.items():
        modality = _MODALITY_OF_EXT.get(ext)
        if data is not None:
            out[ext] = data
        elif modality in cfg.modalities and cfg.on_error == "drop_modality":
            counts.dropped[f"{modality}:too_large"] += 1
        elif modality in cfg.modalities:
            _skip(counts, shard, key, "too_large", f"({ext})")
            return None
    return out


def decode_one(key: str, members: dict, meta: dict, cfg: ReaderConfig, spec: InputSpec,
               counts: ShardCounts, shard: Shard, out: dict[str, np.ndarray] | None = None) -> dict | None:
    """Decode one sample into a row (its arrays written into `out` when given), updating the
    counters; None when it is skipped."""
    members = _without_oversized(key, members, cfg, counts, shard)
    if members is None:
        return None
    result = decode.decode_sample(members, cfg.modalities, spec, cfg.limits, cfg.label_fields,
                                  cfg.on_error, key=key, meta=meta, out=out)
    for modality, reason in result.dropped.items():
        counts.dropped[f"{modality}:{reason}"] += 1
    if result.sample is None:
        _skip(counts, shard, key, result.skip_reason or "unknown")
        return None
    counts.good += 1
    counts.good_per_modality.update(m for m in cfg.modalities if result.sample[f"{m}_mask"])
    return result.sample


class BlockBuilder:
    """One block's rows, decoded straight into the block's arrays: row i of each modality's
    (capacity, *shape) array is the `out=` of the i-th sample's decode.

    Why: stacking a block's per-sample arrays was a visible share of a decode task's CPU in
    profiles of the data benchmark; decoding in place saves that copy and the decoders' own output
    arrays. Each block gets fresh arrays: Ray Data may still hold a yielded block (its output
    buffer merges small ones), so a buffer is never reused."""

    def __init__(self, capacity: int, cfg: ReaderConfig, spec: InputSpec):
        self.cfg, self.spec = cfg, spec
        self.columns = {m: np.empty((capacity, *spec.shape(m)), np.int64 if m == "text" else np.float32)
                        for m in cfg.modalities}
        self.rows: list[dict] = []

    def __len__(self) -> int:
        return len(self.rows)

    def slots(self) -> dict[str, np.ndarray]:
        """Where the next row's arrays go."""
        return {m: column[len(self.rows)] for m, column in self.columns.items()}

    def add(self, row: dict) -> None:
        """A row whose arrays were written into `slots()`."""
        self.rows.append(row)

    def build(self):
        """-> one Arrow block (tensor columns for the arrays, strings for key/caption/labels)."""
        n = len(self.rows)
        return BlockAccessor.batch_to_block(decode.stack_samples(
            self.rows, self.cfg.modalities, self.spec, self.cfg.label_fields,
            stacked={m: column[:n] for m, column in self.columns.items()}))


def limit_torch_threads(cpus: float) -> None:
    """Decode with as many torch threads as the task has CPUs (the log-mel's STFT is a torch op).
    Why: the worker imported torch at start-up (ray_runtime.setup_worker), before Ray set
    OMP_NUM_THREADS for the task, so torch sized its pool for the whole machine, and read tasks with
    more threads than CPUs spent several times the CPU per sample fighting over the cores."""
    import torch

    threads = max(1, int(cpus))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def read_shard(task: ShardTask, cfg: ReaderConfig, spec: InputSpec, ledger: tuple[Any, str]) -> Iterator[Any]:
    """The body of one read task: stream, decode and yield blocks of one shard; report counts."""
    os.environ.update(dict(task.storage_env))
    limit_torch_threads(cfg.num_cpus_per_task)
    counts = ShardCounts()
    report = Reporter(ledger[0], ledger[1], (task.epoch, task.shard.name))
    rng = np.random.default_rng(list(task.seed))
    rows_per_block = block_rows(cfg, spec)
    block = BlockBuilder(rows_per_block, cfg, spec)
    for key, members, meta in iter_candidates(task, cfg, rng, counts):
        row = decode_one(key, members, meta, cfg, spec, counts, task.shard, out=block.slots())
        if row is not None:
            block.add(row)
        if len(block) >= rows_per_block:
            yield block.build()
            block = BlockBuilder(rows_per_block, cfg, spec)
            report(counts.as_dict(), final=False)
    account_missing(counts, task.shard)
    if len(block):
        yield block.build()
    if counts.skipped:
        log.warning("shard %s: %d good, skipped %s", task.shard.name, counts.good, dict(counts.skipped))
    report(counts.as_dict(), final=True)



class ShardDatasource(Datasource):
    """One ReadTask per shard, in the given (epoch) order."""

    def __init__(self, tasks: list[ShardTask], cfg: ReaderConfig, spec: InputSpec, stats: ReadStats):
        """Holds `stats` so its ledger lives as long as the data set; read tasks get only
        (actor handle, ledger id)."""
        super().__init__()
        self.tasks, self.cfg, self.spec, self.stats = tasks, cfg, spec, stats
        self.ledger = (stats.actor, stats.id)
        self.per_sample = bytes_per_sample(cfg, spec)

    def get_name(self) -> str:
        return "RaybindShards"

    def _estimate(self, task: ShardTask) -> int | None:
        n = task.shard.count_for(self.cfg.split if self.cfg.split_by == "field" else None)
        return None if n is None else max(0, n - task.offset) * self.per_sample

    def estimate_inmemory_data_size(self) -> int | None:
        sizes = [self._estimate(t) for t in self.tasks]
        return None if None in sizes else sum(sizes)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # num_rows stays None: decode failures make any count a guess, and Ray Data would trust it
        # for ds.count().
        return [ReadTask(functools.partial(read_shard, t, self.cfg, self.spec, self.ledger),
                         BlockMetadata(num_rows=None, size_bytes=self._estimate(t),
                                       input_files=[t.shard.url], exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for t in self.tasks]
