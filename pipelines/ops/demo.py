"""`raybind demo`: the main job on embedded defaults, end to end on this machine.

synth ShapesWorld shards -> pretrain the `tiny` model on 2 CPU workers (Ray Train fed by Ray Data)
-> evaluate (retrieval + zero-shot) -> register in MLflow; prints where everything is and what to
run next.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from models.spec import MODALITIES
from pipelines.data.write.synth import SynthConfig, synthesize
from pipelines.training.pretrain import PretrainConfig, run_pretrain


@dataclass(frozen=True)
class DemoConfig:
    data: SynthConfig = field(default_factory=lambda: SynthConfig(samples=2000, shard_size=250, overwrite=True))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


def run_demo(cfg: DemoConfig) -> dict:
    start = time.perf_counter()
    synth = synthesize(cfg.data)
    pretrain_cfg = dataclasses.replace(cfg.pretrain, data=dataclasses.replace(cfg.pretrain.data, train=synth["out"]))
    trained = run_pretrain(pretrain_cfg)
    registered = trained.get("registered", {})
    model_uri = registered.get("uri", "")
    return {
        "job": "demo",
        "shards": synth["out"],
        "samples": synth["samples"],
        "synth_seconds": synth["seconds"],
        "train_steps": trained["steps"],
        "train_seconds": trained["seconds"],
        "eval": trained.get("eval", {}),
        "retrieval_R@1": trained.get("retrieval_R@1", {}),
        "zero_shot": trained.get("zero_shot", {}),
        "mlflow_run_id": trained["mlflow_run_id"],
        "registered_model": model_uri or "(not registered)",
        "aliases": registered.get("aliases", []),
        "checkpoints": trained["storage"],
        "mlflow_ui": trained["mlflow_ui"],
        "next": next_commands(synth["out"], model_uri),
        "seconds": round(time.perf_counter() - start, 1),
    }


def next_commands(shards: str, model_uri: str) -> list[str]:
    if not model_uri:
        return []
    return [f"raybind index build --model {model_uri} --data {shards}",
            "raybind serve --config serving/config.yaml",
            "raybind evaluate --model " + model_uri + " --json"]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def render_demo(summary: dict) -> str:
    """The demo's summary: where things are, R@1 per pair, zero-shot per attribute, the next commands.
    Commands stand on lines of their own so that they can be copied whole."""
    lines = [f"raybind demo: {summary['samples']} samples, {summary['train_steps']} steps in "
             f"{summary['seconds']} s (synth {summary['synth_seconds']} s, train {summary['train_seconds']} s)",
             f"  shards       {summary['shards']}",
             f"  checkpoints  {summary['checkpoints']}",
             f"  MLflow run   {summary['mlflow_run_id']}",
             f"  model        {summary['registered_model']}  aliases: {', '.join(summary['aliases']) or '-'}"]
    pairs = summary.get("retrieval_R@1", {})
    if pairs:
        lines += ["", "retrieval R@1 (held-out split)"]
        width = max(len(p) for p in pairs)
        lines += [f"  {pair:<{width}}  {_fmt(r)}" for pair, r in pairs.items()]
    zero = summary.get("zero_shot", {})
    if zero:
        shown = {m for per in zero.values() for m in per}
        modalities = [m for m in MODALITIES if m in shown]
        width = max(len(a) for a in zero)
        lines += ["", "zero-shot accuracy per attribute", "  " + " " * width + "".join(f"  {m:>6}" for m in modalities)]
        lines += ["  " + f"{attr:<{width}}" + "".join(f"  {_fmt(per.get(m)):>6}" for m in modalities)
                  for attr, per in zero.items()]
    lines += ["", "inspect the run in MLflow:", f"  {summary['mlflow_ui']}"]
    if summary.get("next"):
        lines += ["", "next:"] + [f"  {command}" for command in summary["next"]]
    return "\n".join(lines)
