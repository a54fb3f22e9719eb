"""Tux Paint retrieval: a locked pretrained text tower (all-MiniLM-L6-v2, LiT) vs the same model with
no pretrained tower, both trained by `raybind pretrain` (Ray Train + Ray Data + MLflow) on the Tux
Paint stamps and evaluated on the held-out `test` split (only the sample itself counts as a match).

    .venv/bin/python benchmarks/tuxpaint_retrieval.py            # ~10 min on 2 CPU cores
    .venv/bin/python benchmarks/tuxpaint_retrieval.py --steps 20  # a quick smoke run

Builds the data set first when `--data` has no manifest.json (apt-get download of the Debian package,
~160 MB). Runs in $RAYBIND_HOME (default .raybind/) and its MLflow store; writes
benchmarks/results/tuxpaint_retrieval.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARMS = {  # name -> (config, what it is)
    "scratch": ("configs/pretrain/tuxpaint-scratch.yaml", "no pretrained tower: tiny open_clip text tower trained from scratch"),
    "minilm-locked": ("configs/pretrain/tuxpaint-minilm.yaml",
                      "all-MiniLM-L6-v2 text tower, locked (LiT); its projection head trains"),
}
PAIRS = ("image->text", "text->image", "audio->text", "text->audio")


def ensure_data(data: str) -> dict:
    from pipelines.data.write.tuxpaint import TuxpaintConfig, build_tuxpaint

    manifest = Path(data) / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    build_tuxpaint(TuxpaintConfig(out=data))
    return json.loads(manifest.read_text())


def run_arm(name: str, config: str, data: str, steps: int) -> dict:
    """One `raybind pretrain` run; returns its eval retrieval metrics read back from MLflow."""
    from mlflow.tracking import MlflowClient

    from pipelines.core.config import load_config
    from pipelines.training.pretrain import PretrainConfig, run_pretrain

    overrides = [f"data.train={data}", f"train.steps={steps}", f"train.checkpoint_every={steps}",
                 "mlflow.registered_model=", f"train.run_name=bench-tuxpaint-{name}-{time.strftime('%Y%m%d-%H%M%S')}"]
    cfg = load_config(PretrainConfig, REPO / config, overrides)
    started = time.perf_counter()
    summary = run_pretrain(cfg)
    metrics = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"]).data.metrics
    retrieval = {}
    for pair in PAIRS:
        prefix = f"eval/{pair.replace('->', '_to_')}/"
        row = {k: metrics.get(prefix + k.replace("@", "_at_")) for k in ("R@1", "R@5", "R@10", "median_rank")}
        if row["R@1"] is not None:
            retrieval[pair] = row
    return {"config": config, "steps": summary["steps"], "seconds": round(time.perf_counter() - started, 1),
            "mlflow_run_id": summary["mlflow_run_id"], "train_loss": metrics.get("train/loss"),
            "retrieval": retrieval}


def test_counts(data: str) -> dict[str, int]:
    """Held-out samples per pair (both modalities present), from the shards' .json members."""
    import tarfile

    counts = {"image-text": 0, "audio-text": 0}
    for shard in sorted(Path(data).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    if meta.get("split") == "test":
                        counts["image-text"] += {"image", "text"} <= set(meta["modalities"])
                        counts["audio-text"] += {"audio", "text"} <= set(meta["modalities"])
    return counts


def markdown(result: dict) -> str:
    n = result["test_samples"]
    lines = ["# Tux Paint retrieval: locked pretrained text tower vs none\n",
             f"Held-out `test` split: {n['image-text']} image-text pairs, {n['audio-text']} audio-text pairs "
             f"(chance R@1 = 1/N). Only the sample itself counts as a match; several stamps share a "
             f"description (\"A flower.\" x6), which caps text->image R@1 below 1.\n",
             "| model | pair | R@1 | R@5 | R@10 | median rank |", "|---|---|---|---|---|---|"]
    for arm, r in result["arms"].items():
        for pair, m in r["retrieval"].items():
            lines.append(f"| {arm} | {pair} | {m['R@1']:.3f} | {m['R@5']:.3f} | {m['R@10']:.3f} | {m['median_rank']:.0f} |")
    lines.append("")
    for arm, r in result["arms"].items():
        lines.append(f"- **{arm}**: {ARMS[arm][1]}; `{r['config']}`, {r['steps']} steps, {r['seconds']} s "
                     f"(final train loss {r['train_loss']:.3f}).")
    lines.append(f"\nMachine: {result['machine']}. Command: `{result['command']}`. Total {result['seconds']} s.\n")
    return "\n".join(lines)


def main() -> None:
    from pipelines.core import workspace

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(workspace.home() / "data" / "tuxpaint"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    started = time.perf_counter()
    manifest = ensure_data(args.data)
    arms = {name: run_arm(name, config, args.data, args.steps) for name, (config, _) in ARMS.items()}
    result = {"benchmark": "tuxpaint_retrieval", "data": args.data, "samples": manifest["num_samples"],
              "splits": manifest["splits"], "test_samples": test_counts(args.data), "arms": arms,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
              "command": "python benchmarks/tuxpaint_retrieval.py" + (f" --steps {args.steps}" if args.steps != 60 else ""),
              "seconds": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuxpaint_retrieval.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "tuxpaint_retrieval.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
