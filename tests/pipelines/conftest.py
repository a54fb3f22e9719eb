"""Reader fixtures: small ShapesWorld data sets written with the real shard writer, and a helper to
write data sets whose samples the test has tampered with (corrupt members, missing modalities)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from models.spec import AudioSpec, InputSpec
from pipelines.data.write import shapesworld
from pipelines.data.write import writer as shard_writer

# Small media and a small decode spec keep the reader tests fast on 2 cores.
MEDIA = shapesworld.MediaSpec(frame_size=32, num_frames=4, audio_seconds=0.5)
SMALL_SPEC = InputSpec(image_size=32, context_length=16, audio=AudioSpec(clip_seconds=0.5, n_mels=32),
                       video_frames=4, video_size=32)

Sample = tuple[str, dict[str, bytes]]


def make_samples(n: int, seed: int = 0, first: int = 0) -> list[Sample]:
    """ShapesWorld samples (key, {ext: bytes}) for global indices first .. first + n - 1."""
    out = []
    for i in range(first, first + n):
        key = f"{i:09d}"
        out.append((key, shapesworld.render_sample(shapesworld.make_scene(seed, i), MEDIA, key)))
    return out


def write_dataset(out: Path, samples: list[Sample], shard_size: int, index: bool = True) -> Path:
    """Shards + _stats.json (+ sizes.json / manifest.json when `index`) exactly as the writer does."""
    out.mkdir(parents=True, exist_ok=True)
    stats = [shard_writer.write_shard(str(out), i, samples[start:start + shard_size])
             for i, start in enumerate(range(0, len(samples), shard_size))]
    if index:
        shard_writer.write_dataset_index(str(out), stats, {"dataset": "shapesworld-test", "seed": 0})
    return out


@pytest.fixture(scope="session")
def small_spec() -> InputSpec:
    return SMALL_SPEC


@pytest.fixture(scope="session")
def dataset_tools():
    """(make_samples, write_dataset) for tests that build their own data sets."""
    return make_samples, write_dataset


@pytest.fixture(scope="session")
def samples_40() -> list[Sample]:
    return make_samples(40)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory, samples_40) -> Path:
    """40 samples in 5 shards of 8, with manifest.json and sizes.json. Read-only: copy to modify."""
    return write_dataset(tmp_path_factory.mktemp("shapes") / "ds", samples_40, shard_size=8)


@pytest.fixture
def copy_dataset(tmp_path, shapes_dir) -> Callable[[], Path]:
    def copy() -> Path:
        return Path(shutil.copytree(shapes_dir, tmp_path / "copy"))
    return copy
