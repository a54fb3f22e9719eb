"""The operations commands' argument parsing (positional arguments, so not config jobs):
`raybind submit`, `raybind jobs list|logs|stop`, `raybind cluster env`, `raybind schedule install`,
`raybind runs list|show`. Their failures (cluster not up, job failed, night locked) exit 1 with one
line; usage errors exit 2 as everywhere in the CLI."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

EXIT_FAILED = 1


def guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Operational failures print `raybind: error: ...` and exit 1 instead of a traceback."""
    def run(args: argparse.Namespace) -> int:
        from pipelines.cluster import ClusterError
        from pipelines.jobs import JobFailedError
        from pipelines.nightly import NightLockedError

        try:
            return handler(args)
        except (ClusterError, JobFailedError, NightLockedError, TimeoutError, ConnectionError) as exc:
            print(f"raybind: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    return run


def _submit(args: argparse.Namespace) -> int:
    from pipelines.jobs import SubmitRequest, submit

    summary = submit(SubmitRequest(pipeline=tuple(args.pipeline), config=args.config,
                                   overrides=tuple(args.overrides), follow=args.follow,
                                   submission_id=args.name, address=args.address))
    if args.json:
        print(json.dumps(summary, indent=1))
    return 0


def _jobs_list(args: argparse.Namespace) -> int:
    from pipelines.jobs import list_jobs, print_jobs

    rows = list_jobs(args.address, args.limit)
    print(json.dumps(rows, indent=1)) if args.json else print_jobs(rows)
    return 0


def _jobs_logs(args: argparse.Namespace) -> int:
    from pipelines.jobs import job_logs

    status = job_logs(args.job_id, args.follow, args.address)
    return 0 if status in ("SUCCEEDED", "RUNNING", "PENDING") else EXIT_FAILED


def _jobs_stop(args: argparse.Namespace) -> int:
    from pipelines.jobs import stop_job

    stop_job(args.job_id, args.address)
    return 0


def _cluster_env(args: argparse.Namespace) -> int:
    from pipelines.cluster import env_lines, require_state

    print("\n".join(env_lines(require_state())))
    return 0


def _schedule_install(args: argparse.Namespace) -> int:
    from pipelines.schedule import ScheduleRequest, install

    install(ScheduleRequest(cron=args.cron, config=args.config, print_only=args.print_only,
                            cron_file=args.cron_file))
    return 0


def _runs_list(args: argparse.Namespace) -> int:
    from pipelines.runs import list_runs, print_runs

    report = list_runs(args.experiment, args.limit, args.job, args.tracking_uri)
    print(json.dumps(report, indent=1, default=str)) if args.json else print_runs(report)
    return 0


def _runs_show(args: argparse.Namespace) -> int:
    from pipelines.runs import print_run, show_run

    report = show_run(args.run, args.experiment, args.tracking_uri)
    print(json.dumps(report, indent=1, default=str)) if args.json else print_run(report)
    return 0


def add_jobs_commands(subs: dict[str, Any]) -> None:
    s = subs[""].add_parser("submit", help="run any pipeline as a Ray Job on the cluster (token auth)",
                            description="Submit a pipeline (pretrain, data synth, index build, nightly, ...) "
                            "through the Ray Jobs SDK: working_dir = this repo, MLflow URI and token path as env.")
    s.add_argument("pipeline", nargs="+", help="the pipeline's command words, e.g. `pretrain` or `index build`")
    s.add_argument("--config", default=None, metavar="FILE.yaml", help="its config (default: its default config)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--follow", action="store_true", help="stream the logs; exit 1 with the last lines if it fails")
    s.add_argument("--name", default=None, help="submission id (default: Ray picks one)")
    s.add_argument("--address", default="", help="dashboard URL (default: the local cluster's)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=guarded(_submit))

    jobs = subs[""].add_parser("jobs", help="jobs on the cluster: list, logs, stop")
    sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("list", help="recent jobs, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=guarded(_jobs_list))
    p = sub.add_parser("logs", help="a job's logs (--follow streams them until it ends)")
    p.add_argument("job_id")
    p.add_argument("--follow", action="store_true")
    p.set_defaults(handler=guarded(_jobs_logs))
    p = sub.add_parser("stop", help="stop a running job")
    p.add_argument("job_id")
    p.set_defaults(handler=guarded(_jobs_stop))
    for p in (*sub.choices.values(),):
        p.add_argument("--address", default="", help="dashboard URL (default: the local cluster's)")


def add_ops_commands(subs: dict[str, Any]) -> None:
    """Everything above, plus guarded handlers for the config jobs `cluster up|down|status` and `nightly`."""
    add_jobs_commands(subs)
    for name in ("up", "down", "status"):
        p = subs["cluster"].choices[name]
        p.set_defaults(handler=guarded(p.get_default("handler")))
    p = subs[""].choices["nightly"]
    p.set_defaults(handler=guarded(p.get_default("handler")))
    e = subs["cluster"].add_parser("env", help="print `export ...` lines for this cluster: eval \"$(raybind cluster env)\"")
    e.set_defaults(handler=guarded(_cluster_env))

    sched = subs[""].add_parser("schedule", help="schedule the nightly job (cron)")
    sub = sched.add_subparsers(dest="schedule_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("install", help="install (or --print) a cron entry that submits `raybind nightly`")
    p.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: 02:00 every day)")
    p.add_argument("--config", default="configs/nightly.yaml", help="the nightly config")
    p.add_argument("--print", dest="print_only", action="store_true", help="only print the entry")
    p.add_argument("--cron-file", default="", help="write a /etc/cron.d style file here instead of `crontab`")
    p.set_defaults(handler=guarded(_schedule_install))

    runs = subs[""].add_parser("runs", help="MLflow runs, metrics, registered versions and aliases")
    sub = runs.add_subparsers(dest="runs_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("list", help="recent runs and the registered models' versions and aliases")
    p.add_argument("--limit", type=int, default=15)
    p.add_argument("--job", default="", help="only runs of this job (pretrain, nightly, evaluate, ...)")
    p.set_defaults(handler=guarded(_runs_list))
    p = sub.add_parser("show", help="one run: params, metrics, tags, artifacts, registered versions")
    p.add_argument("run", help="run id or run name")
    p.set_defaults(handler=guarded(_runs_show))
    for p in sub.choices.values():
        p.add_argument("--experiment", default="raybind")
        p.add_argument("--tracking-uri", default="", help="default: the cluster's, $MLFLOW_TRACKING_URI, local store")
        p.add_argument("--json", action="store_true")
