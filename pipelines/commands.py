"""Which jobs the CLI offers. Imports stay inside functions so `raybind --help` starts fast."""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.cli import Job


def _synth(cfg):
    from pipelines.synth import synthesize

    return synthesize(cfg)


def _demo(cfg):
    from pipelines.demo import run_demo

    return run_demo(cfg)


def _pretrain(cfg):
    from pipelines.pretrain import run_pretrain

    return run_pretrain(cfg)


def _evaluate(cfg):
    from pipelines.evaluate import run_evaluate

    return run_evaluate(cfg)


def jobs() -> dict[str, list[Job]]:
    from pipelines.demo import DemoConfig
    from pipelines.evaluate import EvaluateConfig
    from pipelines.pretrain import PretrainConfig
    from pipelines.synth import SynthConfig

    return {
        "": [
            Job("demo", "the main job on embedded defaults: synth ShapesWorld shards, read them back, "
                "pretrain the tiny model on 2 CPU workers, evaluate, register", DemoConfig, _demo, "demo.yaml"),
            Job("pretrain", "contrastive pretraining on Ray Train (resume: same train.run_name), "
                "tracked in MLflow, evaluated and registered", PretrainConfig, _pretrain,
                "pretrain/tiny.yaml", config_dir="pretrain"),
            Job("evaluate", "retrieval R@K both ways for every modality pair and zero-shot accuracy per "
                "attribute, with plots, logged to MLflow", EvaluateConfig, _evaluate),
        ],
        "data": [
            Job("synth", "write ShapesWorld synthetic shards (image, text, audio, video) to a folder or "
                "s3:// URL", SynthConfig, _synth, "synth.yaml"),
        ],
    }


def _inspect(args: argparse.Namespace) -> int:
    from pipelines.inspect import format_report, inspect_dataset

    report = inspect_dataset(args.path, limit=args.limit, out_png=args.out)
    if args.json:
        import json

        print(json.dumps(report, indent=1, default=str))
    else:
        print(format_report(report))
    return 0


def extra_commands(subs: dict[str, Any]) -> None:
    """Commands that take positional arguments rather than a config."""
    p = subs["data"].add_parser("inspect", help="count, check and show a few samples of a shard data set",
                                description="Read a data set through the reader: samples per modality, "
                                "skipped samples per reason, sizes; optionally a contact sheet PNG.")
    p.add_argument("path", help="data set folder, shard glob / brace pattern, manifest, or s3:// URL")
    p.add_argument("--limit", type=int, default=None, help="read at most N samples (default: all)")
    p.add_argument("--out", default=None, metavar="PNG", help="write a contact sheet of decoded images/frames")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_inspect)
