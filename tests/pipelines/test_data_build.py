"""`data build`: folders, CSV / Parquet / JSONL tables -> shards with the ShapesWorld conventions;
missing files, unreadable media and duplicate keys are listed in failures.jsonl, never fatal."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from models import decode
from models.spec import InputSpec
from pipelines.core.config import ConfigError
from pipelines.data.write import media
from pipelines.data.write.build import build_dataset
from pipelines.data.write.build_config import BuildConfig
from pipelines.data.write.inputs import hashed_split
from pipelines.data.write.writer import OutputError

pytestmark = pytest.mark.ray
SPEC = InputSpec(image_size=32, context_length=16, video_frames=2, video_size=32)


# ----------------------------------------------------------------------------- media made here
def png(size=(80, 40), color=(200, 30, 30, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpg(size=(30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def wav(seconds=0.5, rate=22050) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buf, np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1) * 0.3, rate, format="WAV")
    return buf.getvalue()


def mp4(frames=12, size=32) -> bytes:
    return media.encode_mp4([Image.new("RGB", (size, size), (i * 20, 0, 0)) for i in range(frames)], 12)


def write(folder: Path, files: dict[str, bytes | str]) -> Path:
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return folder


# ----------------------------------------------------------------------------- reading the output back
def read_samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def by_source(samples: dict) -> dict[str, dict]:
    return {json.loads(m["json"])["source_key"]: m for m in samples.values()}


def failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


def check_index(out: Path, samples: dict) -> dict:
    """sizes.json, per-shard _stats.json and manifest.json agree with the shards."""
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = json.loads((out / "sizes.json").read_text())
    assert manifest["format"] == "raybind-shards/1" and manifest["num_samples"] == len(samples) == sum(sizes.values())
    for name, count in sizes.items():
        stats = json.loads((out / name.replace(".tar", "_stats.json")).read_text())
        assert stats["count"] == count and stats["shard"] == name
    for key, members in samples.items():  # every sample decodes with the reader's decoder
        row = decode.decode_sample(members, ("image", "text", "audio", "video"), SPEC, key=key)
        assert row.sample is not None, (key, row.skip_reason)
    return manifest


# ----------------------------------------------------------------------------- folders
def test_folder_pairs_by_stem_and_lists_every_failure(ray_cluster, tmp_path):
    src = write(tmp_path / "in", {
        "animals/frog.png": png(), "animals/frog.txt": "A frog.\n", "animals/frog.json": '{"kind": "amphibian"}',
        "animals/dog.jpg": jpg(), "animals/dog.wav": wav(), "animals/dog.txt": "A dog barks.",
        "clips/wave.mp4": mp4(), "clips/wave.txt": "A red square fades in.",
        "broken.png": b"not a png at all", "broken.txt": "never written",
        "dup.jpg": jpg(), "dup.png": png(), "dup.txt": "first extension wins",
        "notes/readme.txt": "text alone is not a sample", "notes/data.bin": b"\x00\x01",
    })
    out = tmp_path / "out"
    summary = build_dataset(BuildConfig(input=str(src), out=str(out), shard_size=2, image_max_side=40))
    samples = read_samples(out)
    got = by_source(samples)
    assert set(got) == {"animals/frog", "animals/dog", "clips/wave", "dup"}
    frog = json.loads(got["animals/frog"]["json"])
    assert frog["caption"] == "A frog." and frog["kind"] == "amphibian" and frog["modalities"] == ["image", "text"]
    assert Image.open(io.BytesIO(got["animals/frog"]["jpg"])).size == (40, 20)  # longer side capped
    assert set(got["animals/dog"]) == {"jpg", "wav", "txt", "json"} and got["animals/dog"]["wav"] == wav()
    assert set(got["clips/wave"]) == {"mp4", "txt", "json"}
    assert Image.open(io.BytesIO(got["dup"]["jpg"])).getpixel((5, 5))[1] > 150  # dup.jpg (green), not dup.png
    reasons = {(f["source_key"], f["reason"], f["action"]) for f in failures(out)}
    assert reasons == {("broken", "corrupt_image", "skipped_sample"), ("dup", "duplicate_key", "ignored"),
                       ("notes/readme", "no_media", "skipped_sample")}
    assert summary["ignored_files"] == 1 and summary["failed"] == {"corrupt_image": 1, "duplicate_key": 1, "no_media": 1}
    manifest = check_index(out, samples)
    assert manifest["modalities"] == {"audio": 1, "image": 3, "text": 4, "video": 1}
    assert all(json.loads(m["json"])["split"] in ("train", "val", "test") for m in samples.values())


def test_svg_stamps_are_rendered_when_cairosvg_is_installed(ray_cluster, tmp_path):
    pytest.importorskip("cairosvg")
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="20" height="10">'
           '<rect width="20" height="10" fill="blue"/></svg>')
    src = write(tmp_path / "in", {"star.svg": svg, "star.txt": "A blue star."})
    build_dataset(BuildConfig(input=str(src), out=str(tmp_path / "out"), image_max_side=64, image_format="png"))
    (members,) = read_samples(tmp_path / "out").values()
    im = Image.open(io.BytesIO(members["png"]))
    assert im.size == (64, 32) and im.getpixel((32, 16))[:3] == (0, 0, 255)  # rendered at 64, not upscaled


# ----------------------------------------------------------------------------- tables
def media_folder(root: Path) -> Path:
    return write(root, {"img/a.png": png(), "img/b.jpg": jpg(), "img/c.png": png(color=(0, 0, 255, 255)),
                        "img/bad.jpg": b"\xff\xd8 truncated jpeg", "snd/a.wav": wav(), "snd/bad.wav": b"RIFF junk",
                        "vid/a.mp4": mp4()})


def test_csv_table_with_missing_files_duplicates_and_a_split_column(ray_cluster, tmp_path):
    import pandas as pd

    root = media_folder(tmp_path / "data")
    pd.DataFrame([
        {"id": "a", "image": "img/a.png", "caption": "red thing", "split": "test", "label": "red", "score": 0.5},
        {"id": "b", "image": "img/b.jpg", "caption": "green thing", "split": "train", "label": "green", "score": 1.0},
        {"id": "a", "image": "img/c.png", "caption": "a second a", "split": "train", "label": "blue", "score": 2.0},
        {"id": "m", "image": "img/missing.png", "caption": "gone", "split": "train", "label": "x", "score": None},
        {"id": "z", "image": "img/bad.jpg", "caption": "broken", "split": "train", "label": "y", "score": 3.0},
    ]).to_csv(root / "pairs.csv", index=False)
    out = tmp_path / "out"
    summary = build_dataset(BuildConfig(input=str(root / "pairs.csv"), out=str(out), key_col="id", split_col="split"))
    samples = read_samples(out)
    got = {k: json.loads(m["json"]) for k, m in by_source(samples).items()}
    assert set(got) == {"a", "b"}
    assert got["a"]["split"] == "test" and got["a"]["label"] == "red" and got["a"]["score"] == 0.5
    assert got["a"]["caption"] == "red thing" and got["b"]["split"] == "train"
    assert {(f["source_key"], f["reason"]) for f in failures(out)} == {
        ("a", "duplicate_key"), ("m", "missing_file"), ("z", "corrupt_image")}
    assert [f["path"] for f in failures(out) if f["reason"] == "missing_file"] == [str(root / "img/missing.png")]
    assert summary["samples"] == 2 and check_index(out, samples)["splits"] == {"test": 1, "train": 1}


def test_parquet_table_drops_bad_modalities_and_resamples_audio(ray_cluster, tmp_path):
    import pandas as pd

    root = media_folder(tmp_path / "data")
    pd.DataFrame([
        {"image": "img/a.png", "sound": "snd/a.wav", "text": "a tone", "tags": ["x", "y"]},
        {"image": "img/b.jpg", "sound": "snd/bad.wav", "text": "bad sound", "tags": []},
        {"image": None, "sound": "snd/missing.wav", "text": "nothing left", "tags": ["z"]},
    ]).to_parquet(root / "pairs.parquet")
    out = tmp_path / "out"
    build_dataset(BuildConfig(input=str(root / "pairs.parquet"), out=str(out), audio_col="sound", caption_col="text",
                              on_error="drop_modality", audio_rate=16000, audio_format="flac"))
    got = by_source(read_samples(out))
    assert set(got) == {str(root / "img/a.png"), str(root / "img/b.jpg")}  # key = first media path
    a, b = got[str(root / "img/a.png")], got[str(root / "img/b.jpg")]
    info = sf.info(io.BytesIO(a["flac"]))
    assert (info.samplerate, info.channels) == (16000, 1) and abs(info.duration - 0.5) < 0.01
    assert "flac" not in b and json.loads(b["json"])["tags"] == []
    assert {(f["reason"], f["action"]) for f in failures(out)} == {
        ("corrupt_audio", "dropped_modality"), ("missing_file", "dropped_modality"), ("no_media", "skipped_sample")}


def test_jsonl_table_reencodes_video(ray_cluster, tmp_path):
    root = media_folder(tmp_path / "data")
    (root / "clips.jsonl").write_text(json.dumps({"key": "v1", "video": str(root / "vid/a.mp4"), "caption": "red"}) + "\n")
    out = tmp_path / "out"
    build_dataset(BuildConfig(input=str(root / "clips.jsonl"), out=str(out), video_fps=6, video_max_frames=4))
    (members,) = read_samples(out).values()
    import av

    with av.open(io.BytesIO(members["mp4"])) as container:
        assert len(list(container.decode(video=0))) == 4


def test_output_to_s3(ray_cluster, s3_server, tmp_path):
    import fsspec

    src = write(tmp_path / "in", {"a.png": png(), "a.txt": "A red box.", "b.jpg": jpg(), "b.txt": "A green box."})
    out = "s3://raybind-test/built"
    summary = build_dataset(BuildConfig(input=str(src), out=out))
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server})
    names = {p.rsplit("/", 1)[-1] for p in fs.ls("raybind-test/built")}
    assert {"shard-000000.tar", "shard-000000_stats.json", "sizes.json", "manifest.json", "failures.jsonl"} <= names
    assert summary["samples"] == 2


# ----------------------------------------------------------------------------- no Ray needed
def test_bad_inputs_fail_early_and_name_the_problem(tmp_path):
    import pandas as pd

    pd.DataFrame([{"path": "x.png", "text": "t"}]).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ConfigError, match=r"has none of the media columns .* its columns: \['path', 'text'\]"):
        build_dataset(BuildConfig(input=str(tmp_path / "t.csv"), out=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        build_dataset(BuildConfig(input=str(tmp_path / "nope"), out=str(tmp_path / "o")))
    write(tmp_path / "in", {"a.png": png()})
    write(tmp_path / "full", {"x": "occupied"})
    with pytest.raises(OutputError, match="not empty"):
        build_dataset(BuildConfig(input=str(tmp_path / "in"), out=str(tmp_path / "full")))
    with pytest.raises(ConfigError, match="splits: fractions must add up to 1"):
        BuildConfig(input="x", splits={"train": 0.5})
    with pytest.raises(ConfigError, match="input: is required"):
        build_dataset(BuildConfig())


def test_shipped_yaml_is_the_defaults():
    from pipelines.core.config import load_config

    assert load_config(BuildConfig, Path(__file__).resolve().parents[2] / "configs/data_build.yaml") == BuildConfig()


def test_hashed_split_is_deterministic_and_follows_the_fractions():
    splits = {"train": 0.8, "val": 0.1, "test": 0.1}
    keys = [f"stamp/{i}" for i in range(5000)]
    first = [hashed_split(k, splits) for k in keys]
    assert first == [hashed_split(k, splits) for k in keys]
    counts = {s: first.count(s) / len(keys) for s in splits}
    assert abs(counts["train"] - 0.8) < 0.03 and abs(counts["test"] - 0.1) < 0.02
    assert first != [hashed_split(k, splits, seed=1) for k in keys]
