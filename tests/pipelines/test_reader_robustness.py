"""Broken data: every corruption is skipped and counted by reason; too much of it is an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.data.read import ReaderConfig, ReaderError, ReadStats, read_shards

pytestmark = pytest.mark.ray


def read_all(path, spec, **cfg_kwargs) -> tuple[list[dict], dict]:
    stats = ReadStats()
    ds = read_shards(str(path), config=ReaderConfig(**cfg_kwargs), spec=spec, stats=stats)
    rows = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return rows, stats.snapshot()


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory, samples_40, dataset_tools) -> Path:
    """5 shards x 8: five bad members in shard 0, a zero-byte shard 2, a truncated shard 3 and
    a missing shard 4 (listed in the manifest, file deleted)."""
    from pipelines.data.write.writer import tar_bytes

    _, write_dataset = dataset_tools
    path = write_dataset(tmp_path_factory.mktemp("broken") / "ds", samples_40, shard_size=8)
    samples = [(k, dict(m)) for k, m in samples_40[:8]]
    samples[1][1]["jpg"] = samples[1][1]["jpg"][:200]  # truncated JPEG
    samples[2][1]["wav"] = b""  # zero-byte member
    samples[3][1]["mp4"] = b"\x00\x00\x00\x18ftypisom" + b"\x13" * 300  # undecodable video
    samples[4][1]["json"] = b"{broken"
    samples[5][1]["wav"] = b"RIFF....WAVEfmt " + b"\x01" * 64  # undecodable audio
    (path / "shard-000000.tar").write_bytes(tar_bytes(samples))  # the index still says 8 samples
    (path / "shard-000002.tar").write_bytes(b"")
    tar3 = (path / "shard-000003.tar").read_bytes()
    (path / "shard-000003.tar").write_bytes(tar3[: len(tar3) * 2 // 5])
    (path / "shard-000004.tar").unlink()
    return path


def test_every_corruption_is_skipped_and_counted(ray_cluster, broken_dir, small_spec):
    rows, snap = read_all(broken_dir, small_spec, max_failure_fraction=1.0)
    skipped = snap["skipped"]
    for reason in ("corrupt_image", "empty", "corrupt_video", "corrupt_json", "corrupt_audio"):
        assert skipped[reason] == 1, (reason, skipped)
    assert skipped["corrupt_tar"] == 8 and skipped["unreadable_shard"] == 8
    good_in_truncated = sum(1 for b in rows for k in b["key"] if 24 <= int(k) < 32)
    assert 1 <= skipped["truncated_tar"] and good_in_truncated + skipped["truncated_tar"] == 8
    assert snap["samples_good"] == sum(len(b["key"]) for b in rows) == 40 - snap["samples_skipped"]
    assert set(snap["shard_errors"]) == {"shard-000002.tar", "shard-000003.tar", "shard-000004.tar"}
    assert snap["shard_errors"]["shard-000004.tar"].startswith("unreadable_shard")


def test_rows_equal_their_samples_decoded_alone(ray_cluster, tmp_path, samples_40, dataset_tools, small_spec):
    """Rows are decoded straight into block arrays: a sample that fails half-way (its image and
    audio already written), a dropped member or an absent one must leave nothing of another sample
    behind, in the same block or the next."""
    import numpy as np

    from models.decode import decode_sample
    from models.spec import MODALITIES

    samples = {k: dict(m) for k, m in samples_40[:24]}
    samples["000000001"]["jpg"] = samples["000000001"]["jpg"][:200]  # fails before its image is written
    samples["000000003"]["mp4"] = b"\x00\x00\x00\x18ftypisom" + b"\x13" * 300  # fails last (video)
    samples["000000012"]["wav"] = b""  # corrupt: skipped, or dropped (zeros)
    for key in ("000000009", "000000010", "000000017"):
        del samples[key]["wav"]  # absent: zeros, mask False
    _, write_dataset = dataset_tools
    write_dataset(tmp_path / "ds", list(samples.items()), shard_size=8)
    for on_error, expected in (("skip_sample", 21), ("drop_modality", 24)):
        rows, _ = read_all(tmp_path / "ds", small_spec, max_failure_fraction=1.0, samples_per_block=3,
                           on_error=on_error, shuffle_window=2)
        seen = 0
        for batch in rows:
            for i, key in enumerate(batch["key"]):
                alone = decode_sample(samples[key], MODALITIES, small_spec, on_error=on_error).sample
                for m in MODALITIES:
                    assert batch[f"{m}_mask"][i] == alone[f"{m}_mask"], (key, m, on_error)
                    np.testing.assert_array_equal(batch[m][i], alone[m], err_msg=f"{key} {m} ({on_error})")
                seen += 1
        assert seen == expected, (on_error, seen)


def test_too_many_failures_is_a_clear_error(ray_cluster, broken_dir, small_spec):
    with pytest.raises(Exception) as err:
        read_all(broken_dir, small_spec, max_failure_fraction=0.1, min_samples_for_failure_check=1000)
    text = str(err.value)
    assert isinstance(err.value, ReaderError), type(err.value)
    assert "max_failure_fraction=10.0%" in text and "of samples were skipped" in text
    assert "unreadable_shard=8" in text or "corrupt_tar=8" in text


def test_failure_fraction_checked_early_after_min_samples(ray_cluster, broken_dir, small_spec):
    # shard order is shuffled; whichever broken shard comes first trips the check
    with pytest.raises(ReaderError, match="top reasons"):
        read_all(broken_dir, small_spec, max_failure_fraction=0.02, min_samples_for_failure_check=8,
                 shuffle_shards=False)


def test_member_size_limit_skips_or_drops(ray_cluster, shapes_dir, small_spec):
    limits = {"max_member_bytes": 10_000}  # the 0.5 s wav members are ~16 kB; the rest is smaller
    _, snap = read_all(shapes_dir, small_spec, limits=limits_of(**limits), max_failure_fraction=1.0)
    assert snap["skipped"] == {"too_large": 40} and snap["samples_good"] == 0
    _, snap = read_all(shapes_dir, small_spec, limits=limits_of(**limits), modalities=("image", "video"))
    assert snap["samples_good"] == 40  # the big member belongs to a modality nobody asked for
    rows, snap = read_all(shapes_dir, small_spec, limits=limits_of(**limits), on_error="drop_modality")
    assert snap["samples_good"] == 40 and snap["dropped"] == {"audio:too_large": 40}
    assert not any(b["audio_mask"].any() for b in rows) and all(b["video_mask"].all() for b in rows)


def test_pixel_and_duration_limits(ray_cluster, shapes_dir, small_spec):
    _, snap = read_all(shapes_dir, small_spec, limits=limits_of(max_image_pixels=100),
                       modalities=("image",), max_failure_fraction=1.0)
    assert snap["skipped"] == {"too_many_pixels": 40}
    _, snap = read_all(shapes_dir, small_spec, limits=limits_of(max_audio_seconds=0.2, max_video_seconds=0.1),
                       modalities=("audio", "video"), on_error="drop_modality")
    assert snap["dropped"] == {"audio:audio_too_long": 40, "video:video_too_long": 40}


def limits_of(**kwargs):
    from models.decode import DecodeLimits

    return DecodeLimits(**kwargs)
