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


def _finetune(cfg):
    from pipelines.finetune import run_finetune

    return run_finetune(cfg)


def _index_build(cfg):
    from pipelines.index import run_index_build

    return run_index_build(cfg)


def _data_build(cfg):
    from pipelines.data_build import build_dataset

    return build_dataset(cfg)


def _tuxpaint(cfg):
    from pipelines.tuxpaint import build_tuxpaint

    return build_tuxpaint(cfg)


def _cluster_up(cfg):
    from pipelines.cluster import cluster_up

    return cluster_up(cfg)


def _cluster_down(cfg):
    from pipelines.cluster import cluster_down

    return cluster_down(cfg)


def _cluster_status(cfg):
    from pipelines.cluster import cluster_status

    return cluster_status(cfg)


def _nightly(cfg):
    from pipelines.nightly import run_nightly

    return run_nightly(cfg)


def jobs() -> dict[str, list[Job]]:
    from pipelines.cluster import ClusterConfig, DownConfig, StatusConfig
    from pipelines.data_build import BuildConfig
    from pipelines.demo import DemoConfig
    from pipelines.evaluate import EvaluateConfig
    from pipelines.finetune import FinetuneConfig
    from pipelines.index import IndexConfig
    from pipelines.nightly import NightlyConfig
    from pipelines.pretrain import PretrainConfig
    from pipelines.synth import SynthConfig
    from pipelines.tuxpaint import TuxpaintConfig

    return {
        "": [
            Job("demo", "the main job on embedded defaults: synth ShapesWorld shards, pretrain the tiny "
                "model on 2 CPU workers, evaluate, register", DemoConfig, _demo, "demo.yaml"),
            Job("pretrain", "contrastive pretraining on Ray Train (resume: same train.run_name), "
                "tracked in MLflow, evaluated and registered", PretrainConfig, _pretrain,
                "pretrain/tiny.yaml", config_dir="pretrain"),
            Job("evaluate", "retrieval R@K both ways for every modality pair and zero-shot accuracy per "
                "attribute, with plots, logged to MLflow", EvaluateConfig, _evaluate),
            Job("finetune", "fine-tune a registered model for a downstream task (fusion classification, "
                "linear probe, retrieval) on Ray Train", FinetuneConfig, _finetune,
                "finetune/classification.yaml", config_dir="finetune",
                aliases=(("from", "init.from_model"),)),
            Job("nightly", "one idempotent night: resume pretraining from the champion on the newest shards, "
                "evaluate, promote only if better by the margin, rebuild the index, reconfigure Serve",
                NightlyConfig, _nightly, "nightly.yaml"),
        ],
        "cluster": [
            Job("up", "start a local Ray head (token auth) and MLflow server on 127.0.0.1; addresses go to "
                ".raybind/cluster/state.json", ClusterConfig, _cluster_up),
            Job("down", "stop the local Ray head and MLflow server that `cluster up` started", DownConfig,
                _cluster_down),
            Job("status", "is the local cluster up: processes, job server (with and without the token), "
                "MLflow, jobs", StatusConfig, _cluster_status),
        ],
        "index": [
            Job("build", "embed shards with Ray Data batch inference into a Parquet search index",
                IndexConfig, _index_build),
        ],
        "data": [
            Job("synth", "write ShapesWorld synthetic shards (image, text, audio, video) to a folder or "
                "s3:// URL", SynthConfig, _synth, "synth.yaml"),
            Job("build", "turn a folder or a CSV / Parquet / JSONL table of files + captions into shards",
                BuildConfig, _data_build, "data_build.yaml"),
        ],
        "data example": [
            Job("tuxpaint", "download Debian's Tux Paint stamps (GPL-2) with apt and build image-text and "
                "image-audio-text shards from them", TuxpaintConfig, _tuxpaint),
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


def _serve(args: argparse.Namespace) -> int:
    from serving.run import serve_from_config

    serve_from_config(args.config)
    return 0


def extra_commands(subs: dict[str, Any]) -> None:
    """Commands that take positional arguments rather than a config."""
    s = subs[""].add_parser("serve", help="start the Ray Serve app (embed, zero-shot, search) on 127.0.0.1",
                            description="Deploy a Serve config file (the same file works with `serve deploy`); "
                            "prints the URL and how to call it, then serves until Ctrl-C.")
    s.add_argument("--config", default="serving/config.yaml", help="Serve config (default: serving/config.yaml)")
    s.set_defaults(handler=_serve)
    p = subs["data"].add_parser("inspect", help="count, check and show a few samples of a shard data set",
                                description="Read a data set through the reader: samples per modality, "
                                "skipped samples per reason, sizes; optionally a contact sheet PNG.")
    p.add_argument("path", help="data set folder, shard glob / brace pattern, manifest, or s3:// URL")
    p.add_argument("--limit", type=int, default=None, help="read at most N samples (default: all)")
    p.add_argument("--out", default=None, metavar="PNG", help="write a contact sheet of decoded images/frames")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_inspect)
    from pipelines.ops_cli import add_ops_commands

    add_ops_commands(subs)


def all_pipelines() -> dict[str, Job]:
    """Every config job `raybind submit` can run, by its command words ("pretrain", "index build")."""
    return {f"{group} {job.name}".strip(): job for group, group_jobs in jobs().items() if group != "cluster"
            for job in group_jobs}
