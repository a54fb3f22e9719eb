"""The reader on Ray: the decoded-batch contract, determinism, resume, splits, small shard counts."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from models.spec import MODALITIES
from pipelines.data.read import ReaderConfig, ReadStats, read_shards, to_torch_batches

pytestmark = pytest.mark.ray


def batches(ds) -> list[dict]:
    return list(ds.iter_batches(batch_size=None, batch_format="numpy"))


def keys_of(ds) -> list[str]:
    return [str(k) for b in batches(ds) for k in b["key"]]


@pytest.fixture
def read(small_spec):
    """read(path, epoch=, skip_samples=, **ReaderConfig fields) -> (Dataset, ReadStats)."""
    def _read(path, epoch: int = 0, skip_samples: int = 0, **cfg_kwargs):
        stats = ReadStats()
        ds = read_shards(str(path), config=ReaderConfig(**cfg_kwargs), spec=small_spec, epoch=epoch,
                         skip_samples=skip_samples, stats=stats)
        return ds, stats
    return _read


def test_rows_follow_the_decoded_batch_contract(ray_cluster, read, shapes_dir, small_spec):
    ds, stats = read(shapes_dir, label_fields=("shape", "color", "split"), samples_per_block=5)
    got = batches(ds)
    n = sum(len(b["key"]) for b in got)
    assert n == 40
    b = got[0]
    for m in MODALITIES:
        assert b[m].shape[1:] == small_spec.shape(m)
        assert b[m].dtype == (np.int64 if m == "text" else np.float32)
        assert b[f"{m}_mask"].dtype == bool and b[f"{m}_mask"].all()
    assert isinstance(b["caption"][0], str) and b["caption"][0]
    assert set(b["shape"]) <= {"circle", "square", "triangle", "cross"}
    snap = stats.snapshot()
    assert snap["samples_good"] == 40 and snap["samples_skipped"] == 0
    assert snap["good_per_modality"] == {m: 40 for m in MODALITIES}
    assert snap["shards_done"] == snap["shards_planned"] == 5
    assert snap["bytes_per_modality"]["video"] > 0


def test_order_is_deterministic_per_seed_and_epoch(ray_cluster, read, shapes_dir):
    first = keys_of(read(shapes_dir, seed=1, shuffle_window=4)[0])
    assert first == keys_of(read(shapes_dir, seed=1, shuffle_window=4)[0])
    assert sorted(first) == [f"{i:09d}" for i in range(40)]
    assert first != sorted(first)
    assert first != keys_of(read(shapes_dir, seed=2, shuffle_window=4)[0])
    assert first != keys_of(read(shapes_dir, seed=1, shuffle_window=4, epoch=1)[0])
    plain = keys_of(read(shapes_dir, shuffle_shards=False, shuffle_window=0)[0])
    assert plain == sorted(plain)


def test_skip_samples_resumes_mid_epoch(ray_cluster, read, shapes_dir):
    cfg = {"seed": 3, "shuffle_window": 4, "epoch": 2}
    full = keys_of(read(shapes_dir, **cfg)[0])
    for skip in (5, 8, 21):  # inside the first shard, exactly one shard, two shards and a half
        assert keys_of(read(shapes_dir, skip_samples=skip, **cfg)[0]) == full[skip:]
    assert keys_of(read(shapes_dir, skip_samples=40, **cfg)[0]) == []


def test_split_by_field_and_by_shard(ray_cluster, read, shapes_dir, samples_40):
    import json

    split_of = {k: json.loads(m["json"])["split"] for k, m in samples_40}
    ds, stats = read(shapes_dir, split="train", label_fields=("split",))
    rows = batches(ds)
    assert {s for b in rows for s in b["split"]} == {"train"}
    assert sorted(k for b in rows for k in b["key"]) == sorted(k for k, s in split_of.items() if s == "train")
    assert stats.snapshot()["filtered_split"] == 40 - sum(s == "train" for s in split_of.values())
    # by shard: 5 shards at 0.6 / 0.2 / 0.2 -> 3 / 1 / 1 shards
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    per_split = {s: keys_of(read(shapes_dir, split=s, split_by="shard", shard_split_fractions=fractions)[0])
                 for s in fractions}
    assert [len(per_split[s]) for s in fractions] == [24, 8, 8]
    assert sorted(sum(per_split.values(), [])) == sorted(split_of)


def test_skip_samples_counts_the_split(ray_cluster, read, shapes_dir):
    full = keys_of(read(shapes_dir, split="train", seed=5)[0])
    assert keys_of(read(shapes_dir, split="train", seed=5, skip_samples=10)[0]) == full[10:]


def test_fewer_shards_than_workers_does_not_hang(ray_cluster, read, tmp_path, dataset_tools):
    make_samples, write_dataset = dataset_tools
    path = write_dataset(tmp_path / "one", make_samples(6), shard_size=8)  # a single shard
    ds, _ = read(path)
    splits = ds.streaming_split(2, equal=False)
    counts = [0, 0]

    def consume(i):
        for batch in splits[i].iter_batches(batch_size=4):
            counts[i] += len(batch["key"])

    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a split consumer hung"
    assert sum(counts) == 6


def test_to_torch_batches_gives_tensors_and_string_lists(ray_cluster, read, shapes_dir):
    ds, _ = read(shapes_dir, modalities=("image", "text"), label_fields=("color",))
    got = list(to_torch_batches(ds, batch_size=16))
    assert [len(b["key"]) for b in got] == [16, 16, 8]
    b = got[0]
    assert isinstance(b["image"], torch.Tensor) and b["image"].shape == (16, 3, 32, 32)
    assert b["text"].dtype == torch.int64 and b["image_mask"].dtype == torch.bool
    assert isinstance(b["caption"], list) and isinstance(b["color"][0], str)
    assert "audio" not in b and "video" not in b


def test_several_epochs_in_one_stream(ray_cluster, read, shapes_dir, small_spec):
    cfg = {"seed": 7, "shuffle_window": 4}
    e1, e2 = (keys_of(read(shapes_dir, epoch=e, **cfg)[0]) for e in (1, 2))
    stats = ReadStats()
    ds = read_shards(str(shapes_dir), config=ReaderConfig(**cfg), spec=small_spec, epoch=1, epochs=2,
                     skip_samples=30, stats=stats)
    assert keys_of(ds) == e1[30:] + e2
    snap = stats.snapshot()
    assert snap["samples_good"] == 50 and snap["shards_planned"] == snap["shards_done"] == 2 + 5


def test_read_stats_copies_share_the_ledger(ray_cluster, read, shapes_dir):
    import gc
    import pickle

    ds, stats = read(shapes_dir, modalities=("text",))
    copy = pickle.loads(pickle.dumps(stats))
    keys_of(ds)
    assert copy.snapshot()["samples_good"] == 40
    del copy
    gc.collect()  # a copy going away must not free the original's counters
    assert stats.snapshot()["samples_good"] == 40


def test_read_stats_keep_the_newest_report_whatever_the_arrival_order(ray_cluster):
    import ray

    from pipelines.data.read.stats import Reporter

    stats = ReadStats()
    key, counts = (0, "shard-0.tar"), [{"good": n, "filtered": 0, "skipped": {}, "dropped": {},
                                         "good_per_modality": {}, "bytes_per_modality": {}} for n in (5, 9)]
    # The actor runs calls as they arrive: a late block report must not undo the final one.
    ray.get(stats.actor.report.remote(stats.id, key, counts[1], True, ("task-a", 2)))
    ray.get(stats.actor.report.remote(stats.id, key, counts[0], False, ("task-a", 1)))
    assert stats.snapshot()["samples_good"] == 9
    Reporter(stats.actor, stats.id, key)(dict(counts[0], good=3), final=True)  # a retried task replaces it
    assert stats.snapshot()["samples_good"] == 3


def test_read_tasks_decode_with_one_torch_thread_per_cpu(ray_cluster, read, shapes_dir):
    # Workers import torch at start-up, before Ray sets OMP_NUM_THREADS for a task, so torch's pool
    # is sized for the whole machine unless the read task resizes it: two 2-thread decoders on 2
    # cores cost 3x the CPU per sample (measured). map_batches fuses into the read task.
    def torch_threads(batch: dict) -> dict:  # local: pickled by value for the workers
        import torch
        return {"threads": np.full(len(batch["key"]), torch.get_num_threads())}

    ds, _ = read(shapes_dir, num_cpus_per_task=1.0)
    threads = {int(t) for b in ds.map_batches(torch_threads).iter_batches(batch_size=None)
               for t in b["threads"]}
    assert threads == {1}


def test_first_batch_comes_before_the_first_read_task_ends(ray_cluster, tmp_path):
    """On one node to_torch_batches does not prefetch: Ray's prefetcher holds each block until the
    next one in order exists, which (with preserve_order) kept the first batch back until the first
    read task had finished its whole shard."""
    import time

    import ray
    from ray.data.block import BlockAccessor, BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    from pipelines.data.read.reader import default_prefetch_batches

    go_on = tmp_path / "go-on"

    def slow_shard(first: int):
        yield BlockAccessor.batch_to_block({"key": np.array([f"{first + i}" for i in range(8)]),
                                            "x": np.arange(first, first + 8, dtype=np.float32)})
        deadline = time.time() + 60  # the rest of the shard waits until the consumer has a batch
        while not go_on.exists() and time.time() < deadline:
            time.sleep(0.05)
        yield BlockAccessor.batch_to_block({"key": np.array(["tail"]), "x": np.zeros(1, np.float32)})

    class TwoSlowShards(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(lambda f=f: slow_shard(f), meta) for f in (0, 100)]

    ds = ray.data.read_datasource(TwoSlowShards(), override_num_blocks=2)
    ds.context.execution_options.preserve_order = True
    ds.context.target_max_block_size = 16  # every yielded block passes on at once, as the reader's do
    assert default_prefetch_batches() == 0  # the test cluster has one node
    start = time.perf_counter()
    batches_iter = iter(to_torch_batches(ds, batch_size=4))
    first = next(batches_iter)
    waited = time.perf_counter() - start
    go_on.touch()
    rest = list(batches_iter)
    assert waited < 30, f"the first batch took {waited:.1f} s: it waited for the read task to end"
    assert first["x"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert sum(len(b["key"]) for b in [first, *rest]) == 18
