"""`raybind data synth`: write ShapesWorld shards in parallel, one Ray task per shard.

The manifest declares the data set's evaluation (`"evaluation"`, see pipelines/eval/declared.py);
its zero-shot prompt ensembles (a few thousand captions) go to a side file next to it,
`zero_shot_prompts.json`, so the manifest stays small.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Literal

from pipelines.core import storage, workspace
from pipelines.core.config import require
from pipelines.core.ray_runtime import ensure_ray, run_tasks
from pipelines.core.storage import worker_env
from pipelines.data.write import shapesworld
from pipelines.data.write import writer as shard_writer

PROMPTS_FILE = "zero_shot_prompts.json"


@dataclass(frozen=True)
class SynthConfig:
    out: str = ""  # "" = <work folder>/data/shapesworld
    samples: int = 2000
    shard_size: int = 250
    seed: int = 0
    p_missing_audio: float = 0.0
    p_missing_video: float = 0.0
    frame_size: int = 64
    num_frames: int = 8
    audio_format: Literal["wav", "flac"] = "wav"
    overwrite: bool = False
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        require(self.samples > 0, "samples", f"must be > 0, got {self.samples}")
        require(self.shard_size > 0, "shard_size", f"must be > 0, got {self.shard_size}")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(0.0 <= self.p_missing_audio <= 1.0, "p_missing_audio", "must be in [0, 1]")
        require(0.0 <= self.p_missing_video <= 1.0, "p_missing_video", "must be in [0, 1]")
        require(16 <= self.frame_size <= 512, "frame_size", "must be in [16, 512]")
        require(1 <= self.num_frames <= 64, "num_frames", "must be in [1, 64]")

    @property
    def media(self) -> shapesworld.MediaSpec:
        return shapesworld.MediaSpec(frame_size=self.frame_size, num_frames=self.num_frames,
                                     audio_format=self.audio_format)

    @property
    def num_shards(self) -> int:
        return -(-self.samples // self.shard_size)


def build_shard(cfg: SynthConfig, shard_index: int) -> dict:
    """Render and write one shard; pure function of (cfg, shard_index)."""
    first = shard_index * cfg.shard_size
    indices = range(first, min(first + cfg.shard_size, cfg.samples))
    samples = []
    for i in indices:
        scene = shapesworld.make_scene(cfg.seed, i, cfg.p_missing_audio, cfg.p_missing_video)
        key = f"{i:09d}"
        samples.append((key, shapesworld.render_sample(scene, cfg.media, key)))
    return shard_writer.write_shard(cfg.out, shard_index, samples)


def _run_tasks(cfg: SynthConfig) -> list[dict]:
    import ray

    cfg_ref = ray.put(cfg)
    return run_tasks(build_shard, [(cfg_ref, i) for i in range(cfg.num_shards)], "synth shards", env=worker_env())


def resolve_output(cfg: SynthConfig) -> SynthConfig:
    """Absolute output location, so Ray workers write where the user meant whatever their cwd."""

    out = cfg.out or str(workspace.subdir("data") / "shapesworld")
    if storage.check_scheme(out) != "s3":
        out = storage.filesystem(out)[1]
    return dataclasses.replace(cfg, out=out)


def split_prompts(evaluation: dict, prompts_file: str) -> tuple[dict, dict]:
    """(the evaluation object with its zero-shot prompts replaced by `prompts_file`, the prompts
    {attribute: {value: [prompt, ...]}} that file holds)."""
    zero_shot = {k: {f: v for f, v in entry.items() if f != "prompts"}
                 for k, entry in evaluation.get("zero_shot", {}).items()}
    prompts = {k: entry["prompts"] for k, entry in evaluation.get("zero_shot", {}).items() if "prompts" in entry}
    return {**evaluation, "zero_shot": zero_shot, "prompts_file": prompts_file}, prompts


def synthesize(cfg: SynthConfig) -> dict:
    """Write the data set; returns a summary (counts, where, seconds). Raises OutputError early."""

    cfg = resolve_output(cfg)
    shard_writer.prepare_output(cfg.out, cfg.overwrite)
    ensure_ray()
    start = time.perf_counter()
    try:
        stats = _run_tasks(cfg)
        evaluation, prompts = split_prompts(shapesworld.evaluation_declaration(), PROMPTS_FILE)
        shard_writer.put_atomic(storage.join(cfg.out, PROMPTS_FILE), json.dumps(prompts, indent=1).encode())
        manifest = shard_writer.write_dataset_index(cfg.out, stats, {
            "dataset": "shapesworld", "seed": cfg.seed,
            "attributes": {k: list(v) for k, v in shapesworld.ATTRIBUTES.items()},
            "evaluation": evaluation,
            "media": {"frame_size": cfg.frame_size, "num_frames": cfg.num_frames,
                      "audio_format": cfg.audio_format, "sample_rate": cfg.media.sample_rate},
            "created_by": f"raybind data synth --samples {cfg.samples} --shard-size {cfg.shard_size} "
                          f"--seed {cfg.seed}",
        })
    except BaseException:
        shard_writer.remove_partial(cfg.out)
        fs, path = storage.filesystem(storage.join(cfg.out, PROMPTS_FILE))
        if fs.exists(path):
            fs.rm(path)
        raise
    return {
        "job": "data synth", "out": cfg.out, "samples": manifest["num_samples"],
        "shards": manifest["num_shards"], "modalities": manifest["modalities"],
        "splits": manifest["splits"], "seconds": round(time.perf_counter() - start, 2),
        "manifest": shard_writer.storage.join(cfg.out, "manifest.json"),
    }
