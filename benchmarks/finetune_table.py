"""Fine-tuning on ShapesWorld: fusion strategies against single modalities, pretrained against scratch.

    python benchmarks/finetune_table.py [--home /tmp/raybind-ftbench] [--steps 200] [--pretrain-steps 400]

The label is `shape+rhythm` (12 classes): shape is seen only by image / video, rhythm only by audio,
so one modality can reach ~1/3 (image: shape right, rhythm guessed) or ~1/4 (audio) at best, and
fusing image + audio can reach 1. Everything runs through the real jobs on the local Ray cluster,
each with decoded data cached (`data.cache_decoded=true`): `raybind data synth` (if the data is
missing), `raybind pretrain` of `tiny` as the demo runs it (configs/demo.yaml, registered in this
benchmark's own MLflow store under --home), then one `raybind finetune` per row, all with the same
steps, batch and learning rate.

Targets: every fusion strategy beats the best single modality by >= 20 accuracy points, and each
fusion strategy fine-tuned from the pretrained model beats the same architecture from scratch.
Writes benchmarks/results/finetune_table.{json,md}. Wall times include Ray Train start-up and
evaluation, on 2 shared CPU cores: orders of magnitude, not precise figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
PRETRAINED = "bench-tiny"
LABEL = "shape+rhythm"


@dataclass(frozen=True)
class Row:
    name: str
    group: str  # single | fusion
    strategy: str  # probe | late | early | middle
    modalities: tuple[str, ...]
    pretrained: bool = True

    def overrides(self) -> list[str]:
        kind = "linear_probe" if self.strategy == "probe" else "classification"
        fusion = [] if self.strategy == "probe" else [f"task.fusion={self.strategy}"]
        return [f"task.kind={kind}", *fusion, f"task.modalities=[{','.join(self.modalities)}]",
                f"init.pretrained={str(self.pretrained).lower()}"]


ROWS = (
    Row("linear probe: image", "single", "probe", ("image",)),
    Row("linear probe: audio", "single", "probe", ("audio",)),
    Row("fine-tuned: image only", "single", "late", ("image",)),
    Row("fine-tuned: audio only", "single", "late", ("audio",)),
    *(Row(f"{s} fusion: image+audio{'' if p else ' (scratch)'}", "fusion", s, ("image", "audio"), p)
      for s in ("early", "late", "middle") for p in (True, False)),
)


def prepare_data(samples: int) -> str:
    from pipelines.core import workspace
    from pipelines.data.write.synth import SynthConfig, synthesize

    out = workspace.home() / "data" / "shapesworld"
    if not (out / "manifest.json").is_file():
        print(f"[bench] writing {samples} ShapesWorld samples to {out}")
        synthesize(SynthConfig(out=str(out), samples=samples, shard_size=250, seed=0))
    return str(out)


def pretrained_model(data: str, steps: int) -> tuple[str, dict]:
    """models:/bench-tiny-<config hash>@champion: pretrained once per --home and pretraining config
    (a later run reuses it only if the config, the demo's included, is unchanged)."""
    import dataclasses

    from pipelines.core import tracking
    from pipelines.core.config import load_config, to_dict
    from pipelines.ops.demo import DemoConfig
    from pipelines.registry.model_registry import has_alias
    from pipelines.training.pretrain import run_pretrain

    # The demo's pretraining (configs/demo.yaml: tiny, decode cache with its 32-sample blocks), so the
    # table starts from the model the README's first command produces.
    cfg = load_config(DemoConfig, REPO / "configs" / "demo.yaml",
                      [f"pretrain.data.train={data}", f"pretrain.train.steps={steps}",
                       "pretrain.train.run_name=bench-pretrain", "pretrain.eval.max_samples=256"]).pretrain
    name = f"{PRETRAINED}-{tracking.hash_strings([json.dumps(to_dict(cfg), sort_keys=True, default=str)])[:10]}"
    cfg = dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, registered_model=name))
    ref = f"models:/{name}@champion"
    tracking.configure(tracking.TrackingConfig())
    if has_alias(name, "champion"):
        print(f"[bench] reusing {ref}")
        return ref, {"reused": True}
    summary = run_pretrain(cfg)
    return ref, {"steps": summary["steps"], "seconds": summary["seconds"], "eval": summary.get("eval", {})}


def finetune_row(row: Row, ref: str, data: str, steps: int, seed: int) -> dict:
    from pipelines.core.config import load_config
    from pipelines.training.finetune import run_finetune
    from pipelines.training.finetune_config import FinetuneConfig

    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "classification.yaml",
                      [f"init.from_model={ref}", f"data.train={data}", "data.cache_decoded=true", f"task.label={LABEL}",
                       f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.seed={seed}",
                       "mlflow.registered_model=", "train.log_checkpoints_to_mlflow=false",
                       f"train.run_name=bench-{time.time_ns()}", *row.overrides()])
    summary = run_finetune(cfg)
    return {"name": row.name, "group": row.group, "strategy": row.strategy, "modalities": list(row.modalities),
            "pretrained": row.pretrained, "accuracy": summary["eval"]["accuracy"],
            "macro_f1": summary["eval"]["macro_f1"], "eval_samples": summary["eval"]["samples"],
            "steps": summary["steps"], "seconds": summary["seconds"], "mlflow_run_id": summary["mlflow_run_id"]}


def run_rows(rows: list[Row], ref: str, data: str, args) -> list[dict]:
    """One fine-tuning job per row. Finished rows are kept in --home, so an interrupted benchmark
    resumes where it stopped (same steps and seed)."""
    from pipelines.core import workspace

    done_file = workspace.home() / f"finetune_rows-{args.steps}-{args.seed}.json"
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    for row in rows:
        if row.name not in done:
            done[row.name] = finetune_row(row, ref, data, args.steps, args.seed)
            done_file.write_text(json.dumps(done, indent=1))
        print(f"[bench] {row.name}: accuracy {done[row.name]['accuracy']:.3f} in {done[row.name]['seconds']:.0f} s")
    return [done[r.name] for r in rows]


def check_targets(rows: list[dict]) -> dict:
    single = max((r for r in rows if r["group"] == "single"), key=lambda r: r["accuracy"])
    fusion = {(r["strategy"], r["pretrained"]): r for r in rows if r["group"] == "fusion"}
    margins = {s: round(fusion[(s, True)]["accuracy"] - single["accuracy"], 4) for s, p in fusion if p}
    gains = {s: round(fusion[(s, True)]["accuracy"] - fusion[(s, False)]["accuracy"], 4) for s, p in fusion if p}
    return {"best_single": {"name": single["name"], "accuracy": single["accuracy"]},
            "fusion_minus_best_single": margins, "pretrained_minus_scratch": gains,
            "every_fusion_beats_best_single_by_20_points": all(m >= 0.20 for m in margins.values()),
            "pretrained_beats_scratch_for_every_fusion": all(g > 0 for g in gains.values())}


def markdown(report: dict) -> str:
    t, env = report["targets"], report["environment"]
    lines = [f"# Fine-tuning on ShapesWorld, label `{LABEL}` (`python benchmarks/finetune_table.py`)", "",
             f"Measured {env['date']} on {env['cpus']} CPU cores ({env['processor']}), cores shared with other "
             f"jobs. Start model: `tiny` pretrained {report['pretrain'].get('steps', '?')} steps "
             f"(configs/demo.yaml's pretraining, {env['samples']} samples). Every row: {report['steps']} steps, "
             f"batch {report['batch']} x 2 workers, configs/finetune/classification.yaml's optimiser (AdamW, "
             "the same lr for every row; a pretrained backbone at `init.backbone_lr_scale` x lr, a random "
             "one at lr, as `raybind finetune` does); accuracy on the held-out `test` split "
             f"({report['rows'][0]['eval_samples']} samples, 12 classes, chance 0.083). Wall time = the whole "
             "`run_finetune` job (Ray Train start-up, training, evaluation).", "",
             "| row | modalities | init | accuracy | macro-F1 | wall time (s) |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        init = "pretrained" if r["pretrained"] else "scratch"
        lines.append(f"| {r['name']} | {'+'.join(r['modalities'])} | {init} | {r['accuracy']:.3f} | "
                     f"{r['macro_f1']:.3f} | {r['seconds']:.0f} |")
    verdict = {True: "met", False: "NOT met"}
    lines += ["", f"Best single modality: {t['best_single']['name']} ({t['best_single']['accuracy']:.3f}).", "",
              f"- every fusion strategy >= best single + 0.20: **{verdict[t['every_fusion_beats_best_single_by_20_points']]}** "
              f"(margins {json.dumps(t['fusion_minus_best_single'])})",
              f"- pretrained > scratch for every fusion strategy: **{verdict[t['pretrained_beats_scratch_for_every_fusion']]}** "
              f"(pretrained - scratch {json.dumps(t['pretrained_minus_scratch'])})", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--home", default="/tmp/raybind-ftbench", help="the benchmark's own RAYBIND_HOME")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    args = p.parse_args()
    os.environ["RAYBIND_HOME"] = args.home
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the benchmark's own store, under --home

    from pipelines.core.config import load_config
    from pipelines.core.ray_runtime import ensure_ray
    from pipelines.training.finetune_config import FinetuneConfig

    ensure_ray()
    data = prepare_data(args.samples)
    ref, pretrain = pretrained_model(data, args.pretrain_steps)
    rows = run_rows([r for r in ROWS if not args.only or r.name in args.only], ref, data, args)
    batch = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "classification.yaml").train.batch_size
    report = {"label": LABEL, "steps": args.steps, "batch": batch, "pretrain": pretrain, "rows": rows,
              "targets": check_targets(rows) if not args.only else {},
              "environment": {"date": dt.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                              "processor": platform.processor() or platform.machine(), "samples": args.samples,
                              "home": args.home}}
    if args.only:
        print(json.dumps(report, indent=1))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "finetune_table.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "finetune_table.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
