"""`raybind demo`: the main job on embedded defaults, end to end on this machine.

Today: write ShapesWorld shards, read them back through the reader and report what it saw.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from pipelines.synth import SynthConfig


@dataclass(frozen=True)
class DemoConfig:
    data: SynthConfig = field(default_factory=lambda: SynthConfig(samples=2000, shard_size=250, overwrite=True))


def run_demo(cfg: DemoConfig) -> dict:
    from pipelines.inspect import inspect_dataset
    from pipelines.synth import synthesize

    start = time.perf_counter()
    synth = synthesize(cfg.data)
    report = inspect_dataset(synth["out"])
    return {
        "job": "demo",
        "shards": synth["out"],
        "manifest": synth["manifest"],
        "samples_written": synth["samples"],
        "synth_seconds": synth["seconds"],
        "read_back": {k: report[k] for k in ("good_per_modality", "skipped") if k in report},
        "seconds": round(time.perf_counter() - start, 1),
        "next": f"raybind data inspect {synth['out']} --out contact.png",
    }


def with_data(cfg: DemoConfig, **changes) -> DemoConfig:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))
