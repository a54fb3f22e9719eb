"""Every `raybind` command, in one registry: config jobs (a typed config + a function) and the
commands that take positional arguments (submit, jobs, runs, schedule, cluster env, data inspect,
serve)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from pipelines.cli.config_jobs import Job, results_stream
from pipelines.core import strict_json
from pipelines.ops import cluster, runs, schedule
from pipelines.ops import jobs as ops_jobs


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand with its own positional arguments: `arguments` adds them, `handler` runs it."""

    group: str  # "" for top-level, else the parent command's words ("jobs", "data")
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    description: str = ""


def jobs() -> dict[str, list[Job]]:
    """The config jobs by command group ("" = top level)."""
    return {
        "": [
            Job("demo", "the main job on embedded defaults: synth ShapesWorld shards, pretrain the tiny "
                "model on 2 CPU workers, evaluate, register", "pipelines.ops.demo", "DemoConfig", "run_demo",
                "demo.yaml", renderer="render_demo"),
            Job("pretrain", "contrastive pretraining on Ray Train (resume: same train.run_name), "
                "tracked in MLflow, evaluated and registered", "pipelines.training.pretrain", "PretrainConfig",
                "run_pretrain",
                "pretrain/tiny.yaml", config_dir="pretrain"),
            Job("evaluate", "retrieval R@K both ways for every modality pair and zero-shot accuracy per "
                "attribute, with plots, logged to MLflow", "pipelines.eval.evaluate", "EvaluateConfig",
                "run_evaluate"),
            Job("finetune", "fine-tune a registered model for a downstream task (fusion classification, "
                "linear probe, retrieval) on Ray Train", "pipelines.training.finetune", "FinetuneConfig",
                "run_finetune",
                "finetune/classification.yaml", config_dir="finetune",
                aliases=(("from", "init.from_model"),)),
            Job("nightly", "one idempotent night: resume pretraining from the champion on the newest shards, "
                "evaluate, promote only if better by the margin, rebuild the index, reconfigure Serve",
                "pipelines.ops.nightly", "NightlyConfig", "run_nightly", "nightly.yaml"),
        ],
        "cluster": [
            Job("up", "start a local Ray head (token auth) and MLflow server on 127.0.0.1; addresses go to "
                ".raybind/cluster/state.json", "pipelines.ops.cluster", "ClusterConfig", "cluster_up"),
            Job("down", "stop the local Ray head and MLflow server that `cluster up` started",
                "pipelines.ops.cluster", "DownConfig", "cluster_down"),
            Job("status", "is the local cluster up: processes, job server (with and without the token), "
                "MLflow, jobs", "pipelines.ops.cluster", "StatusConfig", "cluster_status"),
        ],
        "index": [
            Job("build", "embed shards with Ray Data batch inference into a Parquet search index",
                "pipelines.eval.index", "IndexConfig", "run_index_build"),
        ],
        "data": [
            Job("synth", "write ShapesWorld synthetic shards (image, text, audio, video) to a folder or "
                "s3:// URL", "pipelines.data.write.synth", "SynthConfig", "synthesize", "synth.yaml"),
            Job("build", "turn a folder or a CSV / Parquet / JSONL table of files + captions into shards",
                "pipelines.data.write.build", "BuildConfig", "build_dataset", "data_build.yaml"),
        ],
        "data example": [
            Job("tuxpaint", "download Debian's Tux Paint stamps (GPL-2) with apt and build image-text and "
                "image-audio-text shards from them", "pipelines.data.write.tuxpaint", "TuxpaintConfig",
                "build_tuxpaint"),
        ],
    }


def all_pipelines() -> dict[str, Job]:
    """Every config job `raybind submit` can run, by its command words ("pretrain", "index build")."""
    return {f"{group} {job.name}".strip(): job for group, group_jobs in jobs().items() if group != "cluster"
            for job in group_jobs}


def resolve_pipeline(words: tuple[str, ...]) -> Job:
    """The config job for `words` (e.g. ("index", "build")), or ValueError listing what exists."""
    pipelines = all_pipelines()
    key = " ".join(words)
    if key not in pipelines:
        raise ValueError(f"submit: unknown pipeline {key!r}; choose one of {', '.join(sorted(pipelines))}")
    return pipelines[key]


def print_json(value) -> None:
    print(strict_json.dumps(value, indent=1))


# ----------------------------------------------------------------------------- handlers
def _inspect(args: argparse.Namespace) -> int:
    from pipelines.data.read.inspect import format_report, inspect_dataset  # the reader imports Ray

    with results_stream() as out:  # the reader runs on Ray: its logs must not reach stdout
        report = inspect_dataset(args.path, limit=args.limit, out_png=args.out)
        out.write((strict_json.dumps(report, indent=1) if args.json else format_report(report)) + "\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from serving.run import serve_from_config  # Serve's imports are only paid by this command

    serve_from_config(args.config)
    return 0


def _submit(args: argparse.Namespace) -> int:
    job = resolve_pipeline(tuple(args.pipeline))
    summary = ops_jobs.submit(ops_jobs.SubmitRequest(
        pipeline=tuple(args.pipeline), config=args.config, overrides=tuple(args.overrides), follow=args.follow,
        submission_id=args.name, address=args.address, config_cls=job.config_cls,
        default_config=job.default_config_path()))
    if args.json:
        print_json(summary)
    return 0


def _jobs_list(args: argparse.Namespace) -> int:
    rows = ops_jobs.list_jobs(args.address, args.limit)
    print_json(rows) if args.json else ops_jobs.print_jobs(rows)
    return 0


def _jobs_logs(args: argparse.Namespace) -> int:
    status = ops_jobs.job_logs(args.job_id, args.follow, args.address)
    return 0 if status in ("SUCCEEDED", "RUNNING", "PENDING") else 1


def _jobs_stop(args: argparse.Namespace) -> int:
    ops_jobs.stop_job(args.job_id, args.address)
    return 0


def _cluster_env(args: argparse.Namespace) -> int:
    print("\n".join(cluster.env_lines(cluster.require_state())))
    return 0


def _schedule_install(args: argparse.Namespace) -> int:
    schedule.install(schedule.ScheduleRequest(cron=args.cron, config=args.config, print_only=args.print_only,
                                              cron_file=args.cron_file))
    return 0


def _runs_list(args: argparse.Namespace) -> int:
    report = runs.list_runs(args.experiment, args.limit, args.job, args.tracking_uri)
    print_json(report) if args.json else runs.print_runs(report)
    return 0


def _runs_show(args: argparse.Namespace) -> int:
    report = runs.show_run(args.run, args.experiment, args.tracking_uri)
    print_json(report) if args.json else runs.print_run(report)
    return 0


# ----------------------------------------------------------------------------- their arguments
def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="serving/config.yaml", help="Serve config (default: serving/config.yaml)")


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="data set folder, shard glob / brace pattern, manifest, or s3:// URL")
    p.add_argument("--limit", type=int, default=None, help="read at most N samples (default: all)")
    p.add_argument("--out", default=None, metavar="PNG", help="write a contact sheet of decoded images/frames")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", nargs="+", help="the pipeline's command words, e.g. `pretrain` or `index build`")
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="its config (default: its default config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--follow", action="store_true", help="stream the logs; exit 1 with the last lines if it fails")
    p.add_argument("--name", default=None, help="submission id (default: Ray picks one)")
    _address_arg(p)
    p.add_argument("--json", action="store_true")


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="", help="dashboard URL (default: the local cluster's)")


def _jobs_list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    _address_arg(p)


def _job_id_args(follow: bool) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("job_id")
        if follow:
            p.add_argument("--follow", action="store_true")
        _address_arg(p)
    return add


def _schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: 02:00 every day)")
    p.add_argument("--config", default="configs/nightly.yaml", help="the nightly config")
    p.add_argument("--print", dest="print_only", action="store_true", help="only print the entry")
    p.add_argument("--cron-file", default="", help="write a /etc/cron.d style file here instead of `crontab`")


def _runs_args(extra: Callable[[argparse.ArgumentParser], None]) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        extra(p)
        p.add_argument("--experiment", default="raybind")
        p.add_argument("--tracking-uri", default="", help="default: the cluster's, $MLFLOW_TRACKING_URI, local store")
        p.add_argument("--json", action="store_true")
    return add


def _runs_list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=15)
    p.add_argument("--job", default="", help="only runs of this job (pretrain, nightly, evaluate, ...)")


def _runs_show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run id or run name")


def commands() -> list[Command]:
    """The commands with positional arguments."""
    return [
        Command("", "serve", "start the Ray Serve app (embed, zero-shot, search) on 127.0.0.1", _serve_args, _serve,
                "Deploy a Serve config file (the same file works with `serve deploy`); prints the URL and how "
                "to call it, then serves until Ctrl-C."),
        Command("data", "inspect", "count, check and show a few samples of a shard data set", _inspect_args,
                _inspect, "Read a data set through the reader: samples per modality, skipped samples per "
                "reason, sizes; optionally a contact sheet PNG."),
        Command("", "submit", "run any pipeline as a Ray Job on the cluster (token auth)", _submit_args, _submit,
                "Submit a pipeline (pretrain, data synth, index build, nightly, ...) through the Ray Jobs SDK: "
                "working_dir = this repo, MLflow URI and token path as env."),
        Command("jobs", "list", "recent jobs, newest first", _jobs_list_args, _jobs_list),
        Command("jobs", "logs", "a job's logs (--follow streams them until it ends)", _job_id_args(True),
                _jobs_logs),
        Command("jobs", "stop", "stop a running job", _job_id_args(False), _jobs_stop),
        Command("cluster", "env", "print `export ...` lines for this cluster: eval \"$(raybind cluster env)\"",
                lambda p: None, _cluster_env),
        Command("schedule", "install", "install (or --print) a cron entry that submits `raybind nightly`",
                _schedule_args, _schedule_install),
        Command("runs", "list", "recent runs and the registered models' versions and aliases",
                _runs_args(_runs_list_args), _runs_list),
        Command("runs", "show", "one run: params, metrics, tags, artifacts, registered versions",
                _runs_args(_runs_show_args), _runs_show),
    ]


GROUP_HELP = {
    "cluster": "a local Ray head + MLflow server: up, down, status, env",
    "index": "the search index: build",
    "data": "shard data sets: synth, build, inspect, example",
    "data example": "real example data sets",
    "jobs": "jobs on the cluster: list, logs, stop",
    "schedule": "schedule the nightly job (cron)",
    "runs": "MLflow runs, metrics, registered versions and aliases",
}
