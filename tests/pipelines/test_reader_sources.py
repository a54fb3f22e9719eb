"""Shard resolution and the epoch plan (no Ray): inputs the reader accepts, order, splits, resume."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipelines.data.read import sources as S
from pipelines.data.read.datasource import split_name, window_shuffle

NAMES = [f"shard-{i:06d}.tar" for i in range(5)]


def names(shards) -> list[str]:
    return [s.name for s in shards]


def test_inputs_the_reader_accepts(shapes_dir, monkeypatch):
    folder = S.resolve_shards(str(shapes_dir))
    assert names(folder) == NAMES and [s.count for s in folder] == [8] * 5
    assert sum(s.count_for("train") for s in folder) == sum(dict(s.splits)["train"] for s in folder)
    assert all(os.path.isabs(s.url) for s in folder)
    assert names(S.resolve_shards(str(shapes_dir / "manifest.json"))) == NAMES
    assert names(S.resolve_shards(str(shapes_dir / "sizes.json"))) == NAMES
    assert names(S.resolve_shards(str(shapes_dir / "shard-*.tar"))) == NAMES
    assert names(S.resolve_shards(str(shapes_dir / "shard-{000001..000003}.tar"))) == NAMES[1:4]
    assert names(S.resolve_shards([str(shapes_dir / NAMES[4]), str(shapes_dir / NAMES[0])])) == [NAMES[0], NAMES[4]]
    monkeypatch.chdir(shapes_dir.parent)  # relative paths become absolute (workers have another cwd)
    assert S.resolve_shards(f"{shapes_dir.name}/{NAMES[2]}")[0].url == str(shapes_dir / NAMES[2])


def test_counts_from_sizes_json_or_unknown(copy_dataset):
    path = copy_dataset()
    (path / "manifest.json").unlink()
    S.load_index.cache_clear()
    shards = S.resolve_shards(str(path))
    assert [s.count for s in shards] == [8] * 5 and shards[0].count_for("train") is None
    (path / "sizes.json").unlink()
    S.load_index.cache_clear()
    shards = S.resolve_shards(str(path))
    assert names(shards) == NAMES and {s.count for s in shards} == {None}
    with pytest.raises(ValueError, match="skip_samples needs per-shard sample counts"):
        S.plan_skip(shards, 3, None)


def test_bad_inputs_fail_early(tmp_path):
    with pytest.raises(FileNotFoundError):
        S.resolve_shards(str(tmp_path / "empty-*.tar"))
    with pytest.raises(FileNotFoundError):
        S.resolve_shards([])
    with pytest.raises(ValueError, match="unsupported storage scheme"):
        S.resolve_shards("gs://bucket/shards")


def test_shard_order_and_split_by_shard():
    shards = [S.Shard(f"/d/{n}", n, 8) for n in NAMES]
    a = S.order_shards(shards, seed=1, epoch=0, shuffle=True)
    assert names(a) == names(S.order_shards(shards[::-1], seed=1, epoch=0, shuffle=True))
    orders = {tuple(names(S.order_shards(shards, 1, e, True))) for e in range(6)}
    assert len(orders) > 1 and names(S.order_shards(shards, 1, 0, False)) == NAMES
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    parts = {s: names(S.shards_of_split(shards, s, fractions)) for s in fractions}
    assert parts == {"train": NAMES[:3], "val": [NAMES[3]], "test": [NAMES[4]]}
    tiny = {s: names(S.shards_of_split(shards[:2], s, {"train": 0.9, "val": 0.1})) for s in ("train", "val")}
    assert tiny == {"train": [NAMES[0]], "val": [NAMES[1]]}  # a positive fraction gets a shard if it can


def test_plan_skip_drops_whole_shards_then_offsets():
    shards = [S.Shard(f"/d/{n}", n, 8, (("train", 6), ("val", 2))) for n in NAMES]
    assert S.plan_skip(shards, 0, None) == (shards, 0)
    rest, offset = S.plan_skip(shards, 19, None)
    assert names(rest) == NAMES[2:] and offset == 3
    rest, offset = S.plan_skip(shards, 13, "train")
    assert names(rest) == NAMES[2:] and offset == 1
    assert S.plan_skip(shards, 40, None) == ([], 0)


def test_window_shuffle_is_deterministic_and_bounded():
    def run(seed, window=4):
        return list(window_shuffle(iter(range(20)), window, np.random.default_rng(seed)))

    assert run(0) == run(0) and sorted(run(0)) == list(range(20)) and run(0) != list(range(20))
    assert run(0) != run(1)
    assert run(0, window=0) == list(range(20))
    # bounded: the item at output position p was read at most `window` items after p
    out = list(window_shuffle(iter(range(100)), 4, np.random.default_rng(3)))
    assert all(item <= pos + 4 for pos, item in enumerate(out))
    assert sorted(window_shuffle(iter(range(3)), 10, np.random.default_rng(0))) == [0, 1, 2]


def test_member_names_follow_webdataset_keys():
    assert split_name("000000123.jpg") == ("000000123", "jpg")
    assert split_name("./dir/000000123.seg.PNG") == ("dir/000000123", "seg.png")
    assert split_name("README") is None and split_name("dir/.hidden") is None


def test_reader_config_validates_and_loads_from_overrides():
    from pipelines.core.config import ConfigError, load_config
    from pipelines.data.read import ReaderConfig

    cfg = load_config(ReaderConfig, None, ["modalities=[image,text]", "limits.max_image_pixels=1000",
                                           "split=val", "shard_split_fractions.val=0.5"])
    assert cfg.modalities == ("image", "text") and cfg.limits.max_image_pixels == 1000
    assert cfg.split == "val" and cfg.shard_split_fractions["val"] == 0.5
    for bad, field in [(["modalities=[smell]"], "modalities"), (["max_failure_fraction=2"], "max_failure_fraction"),
                       (["on_error=ignore"], "on_error"), (["split_by=shard", "split=dev"], "split")]:
        with pytest.raises(ConfigError, match=field):
            load_config(ReaderConfig, None, bad)


def test_auto_block_rows_are_a_power_of_two_near_the_target_bytes():
    import dataclasses

    from models.spec import InputSpec
    from pipelines.data.read import ReaderConfig, bytes_per_sample
    from pipelines.data.read.config import AUTO_BLOCK_BYTES, block_rows

    spec = InputSpec()
    for modalities in [("image", "text", "audio", "video"), ("image", "text"), ("audio",), ("text",)]:
        cfg = ReaderConfig(modalities=modalities)
        rows = block_rows(cfg, spec)
        assert rows & (rows - 1) == 0 and 16 <= rows <= 1024, (modalities, rows)
        if 16 < rows < 1024:  # not clipped: within a factor sqrt(2) of AUTO_BLOCK_BYTES
            assert 0.7 < rows * bytes_per_sample(cfg, spec) / AUTO_BLOCK_BYTES < 1.42, (modalities, rows)
    assert block_rows(ReaderConfig(), spec) == 256  # 545 kB per row of the default spec: 246 fit
    assert block_rows(dataclasses.replace(ReaderConfig(), samples_per_block=100), spec) == 100
