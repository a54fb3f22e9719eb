"""Config jobs: a typed config + a function. Their flags come from the config's fields
(`--shard-size 100` sets `shard_size`), `--config FILE.yaml` loads a file and `--set a.b=value`
overrides any field, nested ones included."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, get_type_hints

from pipelines.core import strict_json, workspace
from pipelines.core.config import load_config


@dataclasses.dataclass(frozen=True)
class Job:
    """A CLI subcommand backed by a typed config and a function that runs it, both in `module`.

    The module is imported only when the command runs or lists its flags: the job modules import
    Ray, torch and MLflow, which `raybind --help` and the other commands should not wait for."""

    name: str
    help: str
    module: str  # e.g. "pipelines.eval.evaluate"
    config: str  # the config class's name in `module`
    function: str  # the function in `module` that runs the job: config -> summary dict
    default_config: str | None = None  # a file under configs/
    config_dir: str | None = None  # a folder under configs/ whose YAML files all configure this job
    aliases: tuple[tuple[str, str], ...] = ()  # extra flags for nested fields: (("from", "init.from_model"),)
    renderer: str | None = None  # a function in `module`: summary -> text (default: a key/value table)

    @property
    def config_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.config)

    @property
    def run(self) -> Callable[[Any], dict]:
        return getattr(importlib.import_module(self.module), self.function)

    @property
    def render(self) -> Callable[[dict], str]:
        return getattr(importlib.import_module(self.module), self.renderer) if self.renderer else render_table

    def default_config_path(self) -> str | None:
        if self.default_config and (repo_configs() / self.default_config).is_file():
            return str(repo_configs() / self.default_config)
        return None


def repo_configs() -> Path:
    return workspace.REPO / "configs"


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
    parser.add_argument("--json", action="store_true", help="print the summary as JSON (alone on stdout)")
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
    path = args.config if args.config is not None else job.default_config_path()
    flags = [f"{k[len('field__'):]}={v}" for k, v in vars(args).items()
             if k.startswith("field__") and v is not None]
    return load_config(job.config_cls, path, [*args.overrides, *flags])


@contextlib.contextmanager
def results_stream() -> Iterator[IO[str]]:
    """A stream that reaches the real stdout; everything else goes to stderr from here on.

    A job's progress, our log lines and Ray's worker logs (which Ray's log thread prints to the
    driver's stdout, also after the job returned) must not mix with the result a user pipes into
    `jq`. So file descriptor 1 is pointed at stderr for the rest of the process, and the result
    is written to a duplicate of the original descriptor.
    """
    original = sys.stdout
    try:
        fd = original.fileno()
    except (AttributeError, OSError, ValueError):  # a captured / in-memory stdout
        fd = None
    if fd is None:
        sys.stdout = sys.stderr
        try:
            yield original
        finally:
            sys.stdout = original
        return
    original.flush()
    result = os.fdopen(os.dup(fd), "w")
    os.dup2(sys.stderr.fileno(), fd)
    try:
        yield result
    finally:
        result.close()  # a duplicate: fd 1 itself stays pointed at stderr


def render_table(summary: dict) -> str:
    from rich.console import Console
    from rich.table import Table

    title = f"raybind {summary.get('job', '')}: summary"
    table = Table(title=title, show_header=False, min_width=len(title) + 4)
    for key, value in summary.items():
        if key != "job":
            table.add_row(key, strict_json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    buffer = io.StringIO()
    Console(file=buffer, width=120).print(table)
    return buffer.getvalue()


def run_job(job: Job, args: argparse.Namespace) -> int:
    cfg = resolve_config(job, args)
    with results_stream() as out:
        summary = job.run(cfg)
        if args.json:
            out.write(strict_json.dumps(summary, indent=1) + "\n")
        else:
            out.write(job.render(summary).rstrip("\n") + "\n")
    return 0
