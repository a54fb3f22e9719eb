"""The streaming multimodal reader: tar shards (local or S3) -> a Ray Data Dataset of decoded batches.

    stats = ReadStats()
    ds = read_shards("s3://bucket/shapesworld", split="train", config=ReaderConfig(seed=1),
                     spec=model_spec, epoch=3, stats=stats)
    for batch in to_torch_batches(ds, batch_size=64): ...
    stats.snapshot()  # good / skipped per reason, per modality, while or after iterating

Rows follow docs/architecture.md "Decoded batch": one array per requested modality (shaped by the
`InputSpec`), `<modality>_mask`, `key`, `caption`, and the requested `.json` label fields.

Order: shards are permuted by (seed, epoch) (or kept in name order), samples inside a shard are
shuffled in a window of `shuffle_window` by (seed, epoch, shard name); with `preserve_order` (the
default) the row order is the same on every run with the same seed and epoch.
`skip_samples=N` resumes an epoch after its first N samples (positions in that order, counted before
decode failures): whole shards are dropped by their counts from manifest.json / sizes.json, and the
first remaining shard skips the rest without decoding.
Splits: `split_by="field"` keeps samples whose .json `split` matches; `split_by="shard"` assigns whole
shards to splits by `shard_split_fractions` in name order.
Skips are counted per reason by a `ReadStats` actor (see pipelines/data/read/stats.py); exceeding
`max_failure_fraction` stops the data set with `ReaderError`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from models.spec import InputSpec
from pipelines.core import storage
from pipelines.core.config import require
from pipelines.core.ray_runtime import ensure_ray
from pipelines.data.read.config import ReaderConfig, block_rows, bytes_per_sample
from pipelines.data.read.datasource import ShardDatasource, ShardTask
from pipelines.data.read.sources import order_shards, plan_skip, resolve_shards, shard_seed, shards_of_split
from pipelines.data.read.stats import ReadStats


def plan_tasks(urls: str | Sequence[str], cfg: ReaderConfig, epoch: int, skip_samples: int,
               epochs: int = 1) -> list:
    """Read tasks (one per shard and epoch, in order) for epochs epoch .. epoch + epochs - 1, after
    split-by-shard; the first `skip_samples` samples of the first epoch are skipped."""
    shards = resolve_shards(urls)
    if cfg.split is not None and cfg.split_by == "shard":
        shards = shards_of_split(shards, cfg.split, cfg.shard_split_fractions)
    # Workers started before an S3 endpoint / credentials were set (a test's server, a user's shell)
    # get them with the task.
    env = tuple(sorted(storage.worker_env().items())) if any(s.url.startswith("s3://") for s in shards) else ()
    tasks = []
    for e in range(epoch, epoch + epochs):  # epoch e + 1 follows e, each in its own order
        ordered = order_shards(shards, cfg.seed, e, cfg.shuffle_shards)
        rest, offset = plan_skip(ordered, skip_samples if e == epoch else 0,
                                 cfg.split if cfg.split_by == "field" else None)
        tasks += [ShardTask(s, e, tuple(shard_seed(cfg.seed, e, s.name)), offset if i == 0 else 0, env)
                  for i, s in enumerate(rest)]
    return tasks


def read_shards(urls: str | Sequence[str], modalities: Sequence[str] | None = None, split: str | None = None,
                config: ReaderConfig | None = None, spec: InputSpec | None = None, epoch: int = 0,
                skip_samples: int = 0, stats: ReadStats | None = None, epochs: int = 1):
    """Shards -> `ray.data.Dataset` of decoded rows. `modalities` / `split` override `config`.

    The data set holds `epochs` epochs back to back from `epoch` on (each in its own order) and
    skips the first `skip_samples` samples of the first one (resume mid-epoch).
    Pass your own `stats` (a `ReadStats`) to read the skip counters; without one, counters are still
    kept (and max_failure_fraction enforced) but only logged."""
    import ray

    cfg = config or ReaderConfig()
    if modalities is not None:
        cfg = dataclasses.replace(cfg, modalities=tuple(modalities))
    if split is not None:
        cfg = dataclasses.replace(cfg, split=split)
    require(skip_samples >= 0, "skip_samples", "must be >= 0")
    require(epochs >= 1, "epochs", "must be >= 1")
    spec = spec or InputSpec()
    ensure_ray()
    tasks = plan_tasks(urls, cfg, epoch, skip_samples, epochs)
    stats = stats or ReadStats()
    stats.plan([(t.epoch, t.shard.name) for t in tasks], cfg.max_failure_fraction,
               cfg.min_samples_for_failure_check)
    ds = ray.data.read_datasource(ShardDatasource(tasks, cfg, spec, stats),
                                  override_num_blocks=max(1, len(tasks)), num_cpus=cfg.num_cpus_per_task,
                                  concurrency=cfg.max_concurrency)
    configure_context(ds.context, cfg, spec)
    return ds


def configure_context(context, cfg: ReaderConfig, spec: InputSpec) -> None:
    """The reader's settings on a data set's DataContext (read_shards applies them; a benchmark that
    feeds the same blocks another way applies them too)."""
    context.execution_options.preserve_order = cfg.preserve_order
    # Ray Data coalesces a task's output up to target_max_block_size (128 MiB by default: a whole
    # shard of decoded video here) before passing anything on. A target just under one of our
    # blocks hands each block downstream as soon as it is decoded (smaller than 1.5x the target,
    # so it is not sliced either).
    context.target_max_block_size = max(2**20, int(0.9 * block_rows(cfg, spec) * bytes_per_sample(cfg, spec)))
    # Ray Data's per-operator resource reservation held the second read task back at the start of
    # every data set on a small machine (one decode task ran alone at first, and the stagger
    # repeated at the end). The reader is normally the only operator; re-enable it on
    # ds.context if you chain heavy operators after it.
    context.op_resource_reservation_enabled = False


class TorchCollate(NumpyBatchCollateFn):
    """numpy batch -> {column: torch.Tensor}; string columns (key, caption, labels) stay lists of str,
    which `iter_torch_batches` cannot turn into tensors.

    Like Ray's default collate, tensors share memory with the batch, which may be read-only object
    store memory: do not modify them in place, or pass copy=True."""

    def __init__(self, device: str = "cpu", copy: bool = False):
        self.device, self.copy = device, copy

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        for name, column in batch.items():
            if column.dtype.kind in "OUS":
                out[name] = [str(v) for v in column]
                continue
            if self.copy:
                column = column.copy()
            with warnings.catch_warnings():  # torch warns about read-only arrays; see the docstring
                warnings.simplefilter("ignore", UserWarning)
                out[name] = torch.as_tensor(column).to(self.device)
        return out


def default_prefetch_batches() -> int:
    """0 on a one-node cluster, 4 on a larger one.

    Why: Ray's prefetcher tops its window up before it yields a block, so each block waits for the
    next one in order. With `preserve_order` that held a data set's first batch until its first read
    task had finished its whole shard (about twice as late as with no prefetch, on the data
    benchmark). On one node every block is already in the local object store, so there
    is nothing to fetch ahead; the batches are still made in a background thread. Across nodes,
    prefetching overlaps the transfers."""
    import ray

    return 0 if sum(1 for node in ray.nodes() if node.get("Alive")) <= 1 else 4


def to_torch_batches(data, batch_size: int = 32, drop_last: bool = False, device: str = "cpu",
                     prefetch_batches: int | None = None, local_shuffle_buffer_size: int | None = None,
                     local_shuffle_seed: int | None = None, copy: bool = False) -> Iterator[dict[str, Any]]:
    """Batches of torch tensors (+ lists of str) from a Dataset or a Ray Train DataIterator shard.
    `prefetch_batches=None` means `default_prefetch_batches()`."""
    if prefetch_batches is None:
        prefetch_batches = default_prefetch_batches()
    return data.iter_torch_batches(batch_size=batch_size, drop_last=drop_last,
                                   collate_fn=TorchCollate(device, copy), prefetch_batches=prefetch_batches,
                                   local_shuffle_buffer_size=local_shuffle_buffer_size,
                                   local_shuffle_seed=local_shuffle_seed)
