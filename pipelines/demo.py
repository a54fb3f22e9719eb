"""`raybind demo`: the main job on embedded defaults, end to end on this machine.

synth ShapesWorld shards -> pretrain the `tiny` model on 2 CPU workers (Ray Train fed by Ray Data)
-> evaluate (retrieval + zero-shot) -> register in MLflow; prints where everything is.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from pipelines.pretrain import PretrainConfig
from pipelines.synth import SynthConfig


@dataclass(frozen=True)
class DemoConfig:
    data: SynthConfig = field(default_factory=lambda: SynthConfig(samples=2000, shard_size=250, overwrite=True))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


def run_demo(cfg: DemoConfig) -> dict:
    from pipelines.pretrain import run_pretrain
    from pipelines.synth import synthesize

    start = time.perf_counter()
    synth = synthesize(cfg.data)
    pretrain_cfg = dataclasses.replace(cfg.pretrain, data=dataclasses.replace(cfg.pretrain.data, train=synth["out"]))
    trained = run_pretrain(pretrain_cfg)
    registered = trained.get("registered", {})
    return {
        "job": "demo",
        "shards": synth["out"],
        "samples": synth["samples"],
        "synth_seconds": synth["seconds"],
        "train_steps": trained["steps"],
        "train_seconds": trained["seconds"],
        "eval": trained.get("eval", {}),
        "mlflow_run_id": trained["mlflow_run_id"],
        "registered_model": registered.get("uri", "(not registered)"),
        "aliases": registered.get("aliases", []),
        "checkpoints": trained["storage"],
        "mlflow_ui": trained["mlflow_ui"],
        "seconds": round(time.perf_counter() - start, 1),
    }
