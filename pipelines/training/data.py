"""The training data stream: shards -> a multi-epoch Ray Dataset that starts at the data position
of the run's latest checkpoint.

Ray Train (v2) calls a callable passed in `datasets=` each time it starts a worker group, so
`TrainStream` is called again after a worker failure and on a resumed run: it reads the newest
checkpoint's `state.json` from the run's storage and skips the samples already consumed. Epoch e
has its own shard order and shuffle (seed, e), so the stream is the same on every run and a resumed
run repeats or skips at most what was in flight since the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field

from models.spec import InputSpec
from pipelines.core import storage, workspace
from pipelines.core.config import require
from pipelines.data.read import ReaderConfig, bytes_per_sample, read_shards, resolve_shards
from pipelines.training.state import CHECKPOINT_PREFIX, STATE_FILE, verify_checkpoint


@dataclass(frozen=True)
class DataConfig:
    train: str = ""  # shards: folder, glob, brace pattern, manifest or s3:// ("" = .raybind/data/shapesworld)
    eval: str = ""  # held-out shards ("" = the train location, read with eval.split)
    train_split: str = "train"
    # Decode the split once and replay it from Ray's object store every epoch, in a new block order.
    # For small data trained for many epochs (the demo), where decoding again each epoch costs more
    # CPU than training. Refused when the decoded split would not fit.
    cache_decoded: bool = False
    # How the shards are read and decoded: modalities, seed, shuffle window, block size, CPUs per
    # read task, failure budget (pipelines/data/read/config.py). Its split is data.train_split.
    reader: ReaderConfig = field(default_factory=ReaderConfig)

    @property
    def prefetch_batches(self) -> int | None:
        """Batches whose blocks a trainer fetches ahead: None = the reader's default (0 on one
        node). Always 0 with the cache: its epochs replay the same block refs, a window across an
        epoch boundary holds one ref twice and Ray's prefetcher (`ray.wait`) logs an error for
        every batch there."""
        return 0 if self.cache_decoded else None

    def __post_init__(self):
        require(self.reader.split is None, "data.reader.split", "leave it unset: the training split is data.train_split")


@dataclass
class DataPlan:
    """Resolved locations and the reader's skip counters."""

    train_urls: str
    eval_urls: str
    shard_urls: list[str]
    manifest: str | None
    samples_per_epoch: int
    stats: object = field(default=None, repr=False)  # pipelines.data.read.reader.ReadStats

    def skip_counts(self) -> dict[str, float]:
        if self.stats is None:
            return {}
        snapshot = self.stats.snapshot()
        return {k: float(v) for k, v in snapshot.get("skipped", {}).items()}


def resolve_data(cfg: DataConfig) -> DataPlan:
    """Check the shards exist and count them, before any worker starts."""

    train = cfg.train or str(workspace.home() / "data" / "shapesworld")
    if not any(ch in train for ch in "*?[{"):  # a plain location: say so plainly if it is not there
        fs, path = storage.filesystem(train)
        if not fs.exists(path):
            raise FileNotFoundError(f"data.train: no shards found at {train} (nothing exists there)")
    shards = resolve_shards(train)
    if not shards:
        raise FileNotFoundError(f"data.train: no shards found at {train}")
    per_split = [s.count_for(cfg.train_split) for s in shards]
    if any(c is None for c in per_split):
        raise ValueError(f"data.train: {train} has no manifest.json / sizes.json with per-split counts; "
                         "write one (raybind data synth / data build do) so the stream can be sized and resumed")
    manifest = storage.join(train, "manifest.json") if not train.endswith((".tar", ".json", "}")) else None
    return DataPlan(train_urls=train, eval_urls=cfg.eval or train, shard_urls=[s.url for s in shards],
                    manifest=manifest, samples_per_epoch=int(sum(per_split)))


def checkpoint_steps(run_dir: str) -> list[str]:
    """The run's checkpoint folders (locations like `run_dir`), newest first."""
    fs, path = storage.filesystem(run_dir)
    if not fs.exists(path):
        return []
    names = (p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return [storage.join(run_dir, n) for n in sorted((n for n in names if n.startswith(CHECKPOINT_PREFIX)),
                                                      reverse=True)]


def newest_intact_state(run_dir: str) -> dict | None:
    """state.json of the newest checkpoint that matches its checksums; one cut short is skipped for
    the one before, with a warning naming it."""
    for ckpt in checkpoint_steps(run_dir):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            fs, path = storage.filesystem(ckpt)
            return json.loads(fs.cat(f"{path}/{STATE_FILE}"))
        print(f"[raybind] warning: skipping checkpoint {ckpt} ({problem})", file=sys.stderr)
    return None


def latest_position(run_dir: str) -> int:
    """Samples consumed at the newest intact checkpoint under `run_dir` (0 if there is none)."""
    state = newest_intact_state(run_dir)
    return int(state["samples_seen"]) if state else 0


@dataclass(frozen=True)
class TrainStream:
    """Callable building the training Dataset from the run's current data position."""

    data: DataPlan
    config: DataConfig
    spec_dict: dict
    run_dir: str
    samples_needed: int  # for the whole run, from step 0
    label_fields: tuple[str, ...] = ()  # .json fields a task reads as labels (kept as string columns)
    # With data.cache_decoded: the decoded split's blocks (ObjectRefs owned by the driver), see prepared().
    decoded_blocks: tuple = field(default=(), repr=False)

    def reader_config(self) -> ReaderConfig:
        reader = self.config.reader
        return dataclasses.replace(reader, split=self.config.train_split,
                                   label_fields=tuple(dict.fromkeys(reader.label_fields + self.label_fields)))

    def __call__(self):
        position = latest_position(self.run_dir)
        per_epoch = max(1, self.data.samples_per_epoch)
        epoch, offset = divmod(position, per_epoch)
        remaining = max(per_epoch, self.samples_needed - position + per_epoch)
        epochs = -(-(offset + remaining) // per_epoch)
        print(f"[raybind] data stream from epoch {epoch} sample {offset} ({position} consumed), {epochs} epoch(s)")
        if self.config.cache_decoded:
            return self.replayed_epochs(epoch, offset, epochs)
        return read_shards(self.data.train_urls, config=self.reader_config(),
                           spec=InputSpec.from_dict(self.spec_dict), epoch=epoch, skip_samples=offset,
                           epochs=epochs, stats=self.data.stats)

    def prepared(self) -> TrainStream:
        """With data.cache_decoded: this stream with the split decoded now, by the driver.

        Why here and not in the stream's call: Ray Train calls the stream at every worker group start,
        so a group restarted after a failure decoded the whole split again; now every start replays
        the same blocks. The job's first step comes no sooner either way: the decode moves, it does
        not shrink."""
        if not self.config.cache_decoded or self.decoded_blocks:
            return self
        return dataclasses.replace(self, decoded_blocks=tuple(self.decode_split()))

    def decode_split(self) -> list:
        """The train split decoded once, as a list of block refs in a fixed order."""
        import ray

        spec = InputSpec.from_dict(self.spec_dict)
        # Small blocks: an epoch's batches then mix many random groups of 8 scenes.
        # Kept in order, so that a resumed run rebuilds the very same stream.
        reader = dataclasses.replace(self.reader_config(), samples_per_block=8, preserve_order=True)
        needed = self.data.samples_per_epoch * bytes_per_sample(reader, spec)
        budget = ray.cluster_resources().get("object_store_memory", 0) / 2
        require(needed <= budget, "data.cache_decoded",
                f"the decoded split needs ~{needed / 2**30:.1f} GiB, more than half of Ray's object store "
                f"({budget / 2**30:.1f} GiB); turn it off for data this large")
        decoded = read_shards(self.data.train_urls, config=reader, spec=spec, epoch=0, epochs=1,
                              stats=self.data.stats).materialize()
        return [ref for bundle in decoded.iter_internal_ref_bundles() for ref in bundle.block_refs]

    def replayed_epochs(self, epoch: int, offset: int, epochs: int):
        """Epochs `epoch`.. of the split decoded once: each epoch is the same rows in a block order
        of its own (seeded, so a resumed run replays the same stream), the first one after `offset`."""
        import numpy as np
        import ray

        blocks = list(self.decoded_blocks) or self.decode_split()
        order = []
        for e in range(epoch, epoch + epochs):  # the same permutation of blocks for an epoch every time
            order += [blocks[i] for i in np.random.default_rng([self.config.reader.seed, e]).permutation(len(blocks))]
        stream = ray.data.from_arrow_refs(order)  # blocks stay where they are: nothing is copied
        return stream.split_at_indices([offset])[1] if offset else stream
