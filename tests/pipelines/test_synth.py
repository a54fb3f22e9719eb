"""ShapesWorld writer: determinism, decodability, caption consistency, partial modalities, bad output."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.write import shapesworld
from pipelines.data.write import writer as shard_writer
from pipelines.data.write.synth import SynthConfig, build_shard, synthesize


def members_by_key(tar_path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = SynthConfig(out=str(tmp_path / "a"), samples=12, shard_size=5, seed=3)
    b = SynthConfig(out=str(tmp_path / "b"), samples=12, shard_size=5, seed=3)
    c = SynthConfig(out=str(tmp_path / "c"), samples=12, shard_size=5, seed=4)
    for cfg in (a, b, c):
        Path(cfg.out).mkdir()
        for i in range(cfg.num_shards):
            build_shard(cfg, i)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a")["shard-000000.tar"] != digest(tmp_path / "c")["shard-000000.tar"]


def test_sample_bytes_do_not_depend_on_sharding(tmp_path):
    one = SynthConfig(out=str(tmp_path / "one"), samples=6, shard_size=6, seed=1)
    two = SynthConfig(out=str(tmp_path / "two"), samples=6, shard_size=2, seed=1)
    for cfg in (one, two):
        Path(cfg.out).mkdir()
        for i in range(cfg.num_shards):
            build_shard(cfg, i)
    merged = {}
    for p in sorted((tmp_path / "two").glob("*.tar")):
        merged.update(members_by_key(p))
    assert merged == members_by_key(tmp_path / "one" / "shard-000000.tar")


def decode_all(members: dict[str, bytes], media: shapesworld.MediaSpec) -> dict:
    import av
    import soundfile as sf
    from PIL import Image

    out = {"image": np.asarray(Image.open(io.BytesIO(members["jpg"])).convert("RGB")),
           "text": members["txt"].decode("utf-8"), "meta": json.loads(members["json"])}
    if "wav" in members:
        out["audio"], out["rate"] = sf.read(io.BytesIO(members["wav"]))
    if "mp4" in members:
        with av.open(io.BytesIO(members["mp4"])) as c:
            out["video"] = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return out


def dominant_frequency(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


def test_every_member_decodes_and_matches_its_attributes(tmp_path):
    cfg = SynthConfig(out=str(tmp_path), samples=24, shard_size=24, seed=7)
    stats = build_shard(cfg, 0)
    assert stats["count"] == 24 and stats["modalities"] == {"audio": 24, "image": 24, "text": 24, "video": 24}
    for key, members in members_by_key(tmp_path / "shard-000000.tar").items():
        d = decode_all(members, cfg.media)
        meta = d["meta"]
        assert meta["key"] == key and meta["split"] in ("train", "val", "test")
        assert d["image"].shape == (64, 64, 3)
        assert len(d["video"]) == 8 and d["video"][0].shape == (64, 64, 3)
        assert d["rate"] == 16000 and len(d["audio"]) == 32000
        # The caption names every attribute (audio present), and the sound's pitch follows the colour.
        caption = d["text"].lower()
        for attr in ("shape", "color", "size"):
            assert meta[attr] in caption, (attr, caption)
        assert meta["pitch"] == shapesworld.PITCH_OF_COLOR[meta["color"]]
        f0 = shapesworld.PITCH_HZ[meta["pitch"]]
        if meta["rhythm"] != "chirping":  # a chirp sweeps upward from f0
            assert abs(dominant_frequency(d["audio"], 16000) - f0) < 5
        # The image's colour is the named colour: the brightest channel inside the shape.
        img = d["image"].reshape(-1, 3).astype(int)
        shape_px = img[img.sum(1) > 200]
        mean = shape_px.mean(0)
        expected = {"red": lambda m: m[0] > m[1] + 60 and m[0] > m[2] + 60,
                    "green": lambda m: m[1] > m[0] + 60 and m[1] > m[2] + 60,
                    "blue": lambda m: m[2] > m[0] + 60 and m[2] > m[1] + 60,
                    "yellow": lambda m: m[0] > m[2] + 80 and m[1] > m[2] + 80}[meta["color"]]
        assert expected(mean), (meta["color"], mean)


def test_video_moves_in_its_direction():
    for direction, axis, sign in (("left", 1, -1), ("right", 1, 1), ("up", 0, -1), ("down", 0, 1)):
        scene = next(s for i in range(200) if (s := shapesworld.make_scene(0, i)).attributes["direction"] == direction)
        first = np.asarray(shapesworld.render_frame(scene, 0.0, 64)).sum(2) > 150
        last = np.asarray(shapesworld.render_frame(scene, 1.0, 64)).sum(2) > 150
        moved = np.argwhere(last).mean(0)[axis] - np.argwhere(first).mean(0)[axis]
        assert sign * moved > 10, (direction, moved)


def test_partial_modalities(tmp_path):
    cfg = SynthConfig(out=str(tmp_path), samples=200, shard_size=200, seed=0, p_missing_audio=0.5,
                      p_missing_video=1.0)
    stats = build_shard(cfg, 0)
    assert stats["modalities"].get("video", 0) == 0
    assert 60 < stats["modalities"]["audio"] < 140
    for members in members_by_key(tmp_path / "shard-000000.tar").values():
        meta = json.loads(members["json"])
        assert ("wav" in members) == ("audio" in meta["modalities"])
        if "wav" not in members:  # no sound, so the caption does not describe one
            assert not any(w in members["txt"].decode() for w in ("hum", "tone", "beep", "chirp", "whistle"))


@pytest.mark.ray
def test_synthesize_writes_index_and_stats(tmp_path, ray_cluster):
    out = tmp_path / "ds"
    summary = synthesize(SynthConfig(out=str(out), samples=30, shard_size=8, seed=0, audio_format="flac"))
    assert summary["samples"] == 30 and summary["shards"] == 4
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 8, "shard-000001.tar": 8, "shard-000002.tar": 8, "shard-000003.tar": 6}
    assert manifest["num_samples"] == 30 and [s["name"] for s in manifest["shards"]] == list(sizes)
    assert sum(manifest["splits"].values()) == 30
    stats = json.loads((out / "shard-000003_stats.json").read_text())
    assert stats["count"] == 6 and stats["modalities"]["audio"] == 6
    assert any(n.endswith(".flac") for n in tarfile.open(out / "shard-000000.tar").getnames())
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.ray
def test_synthesize_to_s3(ray_cluster, s3_server):
    from pipelines.core.storage import filesystem

    summary = synthesize(SynthConfig(out="s3://raybind-test/synth", samples=10, shard_size=4, seed=0))
    fs, path = filesystem("s3://raybind-test/synth")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path))
    assert summary["shards"] == 3
    assert "manifest.json" in names and "shard-000002.tar" in names and "sizes.json" in names
    assert json.loads(fs.cat(path + "/sizes.json"))["shard-000002.tar"] == 2


def test_output_errors(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(shard_writer.OutputError, match="not empty; pass --overwrite"):
        shard_writer.prepare_output(str(tmp_path / "full"), overwrite=False)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(shard_writer.OutputError, match="unsupported storage scheme 'ftp'"):
        shard_writer.prepare_output("ftp://host/data", overwrite=False)
    (tmp_path / "afile").write_text("")
    with pytest.raises(shard_writer.OutputError, match="not a directory"):
        shard_writer.prepare_output(str(tmp_path / "afile"), overwrite=False)
    with pytest.raises(shard_writer.OutputError, match="not writable"):
        shard_writer.prepare_output(str(tmp_path / "afile" / "sub"), overwrite=False)


def test_remove_partial_leaves_nothing_half_written(tmp_path):
    (tmp_path / "shard-000000.tar").write_bytes(b"x")
    (tmp_path / "shard-000001.tar.tmp-1234abcd").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("user file")
    shard_writer.remove_partial(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
