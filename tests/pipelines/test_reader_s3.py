"""The reader against a real S3 endpoint (moto's server on 127.0.0.1), shards uploaded by s3fs."""

from __future__ import annotations

import pytest

from pipelines.core import storage
from pipelines.data.read import ReaderConfig, ReadStats, read_shards

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def s3_dataset(s3_server, shapes_dir) -> str:
    url = "s3://raybind-test/reader/shapes"
    fs, root = storage.filesystem(url)
    for path in sorted(shapes_dir.iterdir()):
        fs.put_file(str(path), f"{root}/{path.name}")
    return url


def test_read_folder_and_brace_pattern_from_s3(ray_cluster, s3_dataset, small_spec):
    stats = ReadStats()
    ds = read_shards(s3_dataset, config=ReaderConfig(seed=4), spec=small_spec, stats=stats)
    keys = [k for b in ds.iter_batches(batch_size=None, batch_format="numpy") for k in b["key"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(40)]
    snap = stats.snapshot()
    assert snap["samples_good"] == 40 and snap["good_per_modality"]["video"] == 40
    # the same order as the same shards read locally would give is not required, but a rerun is
    ds2 = read_shards(s3_dataset, config=ReaderConfig(seed=4), spec=small_spec)
    assert keys == [k for b in ds2.iter_batches(batch_size=None, batch_format="numpy") for k in b["key"]]


def test_s3_brace_pattern_with_a_missing_shard(ray_cluster, s3_dataset, small_spec):
    stats = ReadStats()
    pattern = s3_dataset + "/shard-{000003..000005}.tar"  # shard-000005 does not exist
    cfg = ReaderConfig(modalities=("image", "text"), max_failure_fraction=0.5, shuffle_shards=False)
    ds = read_shards(pattern, config=cfg, spec=small_spec, stats=stats, skip_samples=3)
    rows = sum(len(b["key"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
    snap = stats.snapshot()
    assert rows == snap["samples_good"] == 13  # 16 in shards 3 and 4, minus the 3 skipped
    assert snap["skipped"] == {"unreadable_shard": 1}  # count unknown: not in the index
    assert "shard-000005.tar" in snap["shard_errors"]
