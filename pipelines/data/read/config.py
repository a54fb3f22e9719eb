"""The reader's settings and the sizes that follow from them (bytes per decoded row, rows per block)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from models.decode import DecodeLimits
from models.spec import MODALITIES, InputSpec
from pipelines.core.config import require

AUTO_BLOCK_BYTES = 128 * 2**20  # Ray Data's own default target_max_block_size


@dataclass(frozen=True)
class ReaderConfig:
    modalities: tuple[str, ...] = MODALITIES
    split: str | None = None  # None = every sample
    split_by: Literal["field", "shard"] = "field"
    shard_split_fractions: dict[str, float] = field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    seed: int = 0
    shuffle_shards: bool = True
    shuffle_window: int = 256  # samples; 0 or 1 = file order inside a shard
    # Rows per Arrow block; 0 = the power of two nearest to 128 MiB of decoded data (256 samples
    # with all four modalities at the default spec; see block_rows). Ray pays a fixed CPU cost per
    # block across the driver, the raylet and the worker, so small blocks cost more per sample.
    samples_per_block: int = 0
    preserve_order: bool = True  # deterministic row order (a slow shard delays the ones behind it)
    label_fields: tuple[str, ...] = ()  # .json fields to keep as string columns
    on_error: Literal["skip_sample", "drop_modality"] = "skip_sample"
    max_failure_fraction: float = 0.05
    min_samples_for_failure_check: int = 200  # before all shards finish, judge only after this many
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    num_cpus_per_task: float = 1.0  # per read/decode task
    max_concurrency: int | None = None  # read tasks at once (None: as many as free CPUs allow)

    def __post_init__(self):
        unknown = sorted(set(self.modalities) - set(MODALITIES))
        require(bool(self.modalities) and not unknown, "modalities",
                f"choose from {', '.join(MODALITIES)}; got {list(self.modalities)}")
        require(self.shuffle_window >= 0, "shuffle_window", "must be >= 0")
        require(self.samples_per_block >= 0, "samples_per_block", "must be >= 0 (0 = about 128 MiB per block)")
        require(0.0 <= self.max_failure_fraction <= 1.0, "max_failure_fraction", "must be in [0, 1]")
        require(self.num_cpus_per_task > 0, "num_cpus_per_task", "must be > 0")
        require(all(v >= 0 for v in self.shard_split_fractions.values()) and
                sum(self.shard_split_fractions.values()) > 0, "shard_split_fractions",
                "must be >= 0 and sum to > 0")
        require(self.split is None or self.split_by == "field" or self.split in self.shard_split_fractions,
                "split", f"{self.split!r} is not in shard_split_fractions")


def bytes_per_sample(cfg: ReaderConfig, spec: InputSpec) -> int:
    """Decoded size of one row, for Ray Data's memory planning."""
    return sum(int(np.prod(spec.shape(m))) * (8 if m == "text" else 4) + 1 for m in cfg.modalities) + 256


def block_rows(cfg: ReaderConfig, spec: InputSpec) -> int:
    """Rows per block: cfg.samples_per_block, or (0) the power of two nearest to what fits in
    AUTO_BLOCK_BYTES (16 .. 1024).

    Why a power of two: batches are usually one too, and a batch that lies inside one block is a
    zero-copy slice, while one that straddles two blocks is concatenated (a copy). With 123-row
    blocks the consumer's batches of 64 straddled every other block; with decoding taken out
    (benchmarks/reader_overhead.py), 128-row blocks streamed faster than 123-row ones in every run.
    Why 128 MiB rather than 64: once a shard's sample count is not a multiple of the batch, every
    block boundary falls inside a batch, so fewer blocks mean fewer copied batches (and less of
    Ray's cost per block). On the data benchmark (250-sample shards, batches of 64), 256-row blocks
    were faster than 128-row ones in 13 of 18 paired rounds, by a few percent at the median (docs/benchmarks.md)."""
    if cfg.samples_per_block:
        return cfg.samples_per_block
    fit = AUTO_BLOCK_BYTES / bytes_per_sample(cfg, spec)
    return int(np.clip(2 ** round(np.log2(max(fit, 1.0))), 16, 1024))
