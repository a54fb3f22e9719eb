"""ShapesWorld writer: determinism, decodability, caption consistency, partial modalities, bad output,
and the evaluation it declares in its manifest (prompts, match attributes)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.write import shapesworld
from pipelines.data.write import writer as shard_writer
from pipelines.data.write.synth import PROMPTS_FILE, SynthConfig, build_shard, synthesize
from pipelines.eval.declared import load_declaration, parse_evaluation


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


# ----------------------------------------------------------------------------- declared evaluation
# The zero-shot prompts `raybind evaluate` used before ShapesWorld declared them itself
# (pipelines.eval.evaluate.class_prompts): the declaration must reproduce them exactly, so the
# ShapesWorld numbers do not move. Digest: sha256 of json.dumps({attribute: {value: prompts}}, sort_keys=True).
OLD_PROMPTS_SHA256 = "fee7072a7c0641bd68a87981d24905389e2b5d11d1b3470de9f687b2acfc3ed9"
OLD_PROMPTS = {
    ("shape", "circle"): (96, {0: "A small circle, red, moving to the left, with a low steady hum",
                               17: "A red circle (large) drifting right; you hear a deep series of chirps",
                               95: "A large yellow circle moving down to a very high series of chirps"}),
    ("color", "red"): (96, {0: "A red circle (small) heading leftward to a low constant tone",
                            17: "A large circle, red, gliding right to a deep series of chirps",
                            95: "A red cross (large) moving downward; you hear a deep chirping whistle"}),
    ("size", "large"): (192, {0: "A large circle, red, moving leftward to a low constant tone",
                              17: "A green circle (large) sliding rightward; you hear a mid-pitched chirping whistle",
                              191: "A yellow cross (large) sliding downward to a shrill series of chirps"}),
    ("rhythm", "chirping"): (128, {0: "There is a small red circle moving leftward, with a low chirping whistle",
                                   17: "There is a small blue circle sliding to the right, with a high series of chirps",
                                   127: "A large cross, yellow, moving towards the bottom to a shrill series of chirps"}),
}


def declared_prompts(evaluation: dict) -> dict[str, dict[str, list[str]]]:
    return {k: entry["prompts"] for k, entry in evaluation["zero_shot"].items()}


def test_declared_prompts_are_the_ones_evaluation_used_before():
    evaluation = shapesworld.evaluation_declaration()
    prompts = declared_prompts(evaluation)
    for (attribute, value), (count, some) in OLD_PROMPTS.items():
        assert len(prompts[attribute][value]) == count, (attribute, value)
        for i, text in some.items():
            assert prompts[attribute][value][i] == text, (attribute, value, i)
    digest = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()
    assert digest == OLD_PROMPTS_SHA256
    assert sum(len(p) for per in prompts.values() for p in per.values()) == 2304


def test_declared_match_and_zero_shot_follow_what_each_modality_shows():
    evaluation = shapesworld.evaluation_declaration()
    assert evaluation["match_on"] == {k: list(v) for k, v in shapesworld.SHOWN_BY.items()}
    assert list(evaluation["zero_shot"]) == list(shapesworld.ATTRIBUTES)
    for attribute, entry in evaluation["zero_shot"].items():
        assert entry["values"] == list(shapesworld.ATTRIBUTES[attribute])
        assert entry["shown_by"] == list(shapesworld.SHOWN_BY[attribute])
    declared = parse_evaluation(evaluation)
    assert declared.match_attributes("text", "video") == ("shape", "color", "size", "direction")
    assert declared.match_attributes("image", "audio") == ("color",)
    assert declared.label_fields == tuple(shapesworld.ATTRIBUTES)


def test_prompts_cover_every_combination_of_the_other_attributes_equally():
    prompts = shapesworld.class_prompts("shape", "circle")
    assert len(prompts) == 4 * 2 * 4 * 3  # color x size x direction x rhythm
    assert all("circle" in p for p in prompts)
    colors = Counter(c for p in prompts for c in shapesworld.ATTRIBUTES["color"] if f" {c}" in p.lower())
    assert set(colors.values()) == {len(prompts) // 4}


def test_pitch_follows_the_colour_in_colour_prompts():
    assert all("red" in p.lower() for p in shapesworld.class_prompts("color", "red"))
    assert all("low" in p.lower() or "deep" in p.lower() for p in shapesworld.class_prompts("color", "red"))
    assert not any("shrill" in p.lower() for p in shapesworld.class_prompts("color", "red"))
    assert all("yellow" in p.lower() for p in shapesworld.class_prompts("pitch", "very high"))


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
    # The manifest declares the evaluation; its prompts live next to it; the loader reads both back.
    assert manifest["evaluation"]["prompts_file"] == PROMPTS_FILE and (out / PROMPTS_FILE).is_file()
    assert all("prompts" not in entry for entry in manifest["evaluation"]["zero_shot"].values())
    assert load_declaration(str(out)) == parse_evaluation(shapesworld.evaluation_declaration(),
                                                          source=str(out / "manifest.json"))


@pytest.mark.ray
def test_synthesize_to_s3(ray_cluster, s3_server):
    from pipelines.core.storage import filesystem

    summary = synthesize(SynthConfig(out="s3://raybind-test/synth", samples=10, shard_size=4, seed=0))
    fs, path = filesystem("s3://raybind-test/synth")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path))
    assert summary["shards"] == 3
    assert "manifest.json" in names and "shard-000002.tar" in names and "sizes.json" in names
    assert json.loads(fs.cat(path + "/sizes.json"))["shard-000002.tar"] == 2
    declared = load_declaration("s3://raybind-test/synth")
    assert declared.declared and declared.source == "s3://raybind-test/synth/manifest.json"
    assert declared.zero_shot == parse_evaluation(shapesworld.evaluation_declaration()).zero_shot


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
