"""The `raybind` command line. Each job is a typed config + a function; its flags come from the
config's fields (`--shard-size 100` sets `shard_size`), `--config FILE.yaml` loads a file and
`--set a.b=value` overrides any field, nested ones included. Bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_type_hints

from pipelines.config import ConfigError, load_config

EXIT_USAGE = 2


@dataclasses.dataclass(frozen=True)
class Job:
    """A CLI subcommand backed by a typed config and a function that runs it."""

    name: str
    help: str
    config_cls: type
    run: Callable[[Any], dict]
    default_config: str | None = None  # a file under configs/
    config_dir: str | None = None  # a folder under configs/ whose YAML files all configure this job
    aliases: tuple[tuple[str, str], ...] = ()  # extra flags for nested fields: (("from", "init.from_model"),)


def _repo_configs() -> Path:
    return Path(__file__).resolve().parents[1] / "configs"


def _scalar_fields(cls: type) -> list[tuple[str, Any]]:
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) or getattr(tp, "__origin__", None) is dict:
            continue
        out.append((f.name, tp))
    return out


def add_config_args(parser: argparse.ArgumentParser, job: Job) -> None:
    default = f" (default: configs/{job.default_config})" if job.default_config else ""
    parser.add_argument("--config", metavar="FILE.yaml", help=f"YAML config file{default}")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override any config field, e.g. --set train.lr=1e-3 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    group = parser.add_argument_group("config fields (shortcuts for --set FIELD=VALUE)")
    for flag, field_path in job.aliases:
        group.add_argument(f"--{flag}", dest=f"field__{field_path}", metavar=field_path.upper(), default=None,
                           help=f"sets {field_path}")
    for name, tp in _scalar_fields(job.config_cls):
        flag = "--" + name.replace("_", "-")
        if tp is bool:
            group.add_argument(flag, dest=f"field__{name}", action="store_const", const="true", default=None)
        else:
            group.add_argument(flag, dest=f"field__{name}", metavar=name.upper(), default=None)


def resolve_config(job: Job, args: argparse.Namespace) -> Any:
    path = args.config
    if path is None and job.default_config and (_repo_configs() / job.default_config).is_file():
        path = str(_repo_configs() / job.default_config)
    flags = [f"{k[len('field__'):]}={v}" for k, v in vars(args).items()
             if k.startswith("field__") and v is not None]
    return load_config(job.config_cls, path, [*args.overrides, *flags])


def print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=1, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"raybind {summary.get('job', '')}: summary", show_header=False)
    for key, value in summary.items():
        if key != "job":
            table.add_row(key, json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)


def run_job(job: Job, args: argparse.Namespace) -> int:
    cfg = resolve_config(job, args)
    summary = job.run(cfg)
    print_summary(summary, args.json)
    return 0


def build_parser(jobs: dict[str, list[Job]]) -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    """The parser, and each command group's subparsers (for commands that are not config jobs)."""
    parser = argparse.ArgumentParser(
        prog="raybind",
        description="Learn one embedding space for image, text, audio and video on Ray; track it in "
                    "MLflow; serve it.",
        epilog="Run `raybind COMMAND --help` for a command's options.")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    subs: dict[str, Any] = {"": groups}
    for group_name, group_jobs in jobs.items():
        if group_name == "":
            for job in group_jobs:
                p = groups.add_parser(job.name, help=job.help, description=job.help)
                add_config_args(p, job)
                p.set_defaults(handler=lambda a, j=job: run_job(j, a))
            continue
        parent, _, child = group_name.rpartition(" ")  # "data example" nests under "data"
        gp = subs[parent].add_parser(child, help=f"{group_name} commands")
        sub = subs[group_name] = gp.add_subparsers(dest=f"command_{len(subs)}", required=True, metavar="SUBCOMMAND")
        for job in group_jobs:
            p = sub.add_parser(job.name, help=job.help, description=job.help)
            add_config_args(p, job)
            p.set_defaults(handler=lambda a, j=job: run_job(j, a))
    return parser, subs


def main(argv: list[str] | None = None) -> int:
    from pipelines.commands import extra_commands, jobs

    parser, subs = build_parser(jobs())
    extra_commands(subs)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        if os.environ.get("RAYBIND_DEBUG"):
            raise
        print(f"raybind: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("raybind: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
