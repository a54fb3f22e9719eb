"""The `raybind` command line: the parser built from the one command registry, and `main`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipelines.cli.commands import GROUP_HELP, commands, jobs
from pipelines.cli.config_jobs import add_config_args, run_job
from pipelines.cli.errors import run_guarded


def _group(subs: dict[str, Any], words: str) -> Any:
    """The subparsers of command group `words` ("data example" nests under "data"), made on first use."""
    if words not in subs:
        parent, _, child = words.rpartition(" ")
        gp = _group(subs, parent).add_parser(child, help=GROUP_HELP.get(words, f"{words} commands"))
        subs[words] = gp.add_subparsers(dest=f"command_{len(subs)}", required=True, metavar="SUBCOMMAND")
    return subs[words]


def selected_words(argv: list[str]) -> str:
    """The command words at the head of `argv` ("data synth" of `data synth --samples 5`)."""
    words = []
    for arg in argv:
        if arg.startswith("-"):
            break
        words.append(arg)
    return " ".join(words)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser. Given `argv`, only the config job it names gets its config flags (which
    imports that job's module); without it, every job does."""
    selected = None if argv is None else selected_words(argv)
    parser = argparse.ArgumentParser(
        prog="raybind",
        description="Learn one embedding space for image, text, audio and video on Ray; track it in "
                    "MLflow; serve it.",
        epilog="Run `raybind COMMAND --help` for a command's options.")
    subs: dict[str, Any] = {"": parser.add_subparsers(dest="group", required=True, metavar="COMMAND")}
    for group, group_jobs in jobs().items():
        for job in group_jobs:
            p = _group(subs, group).add_parser(job.name, help=job.help, description=job.help)
            if selected is None or selected == f"{group} {job.name}".strip():
                add_config_args(p, job)
            p.set_defaults(handler=lambda a, j=job: run_job(j, a))
    for command in commands():
        p = _group(subs, command.group).add_parser(command.name, help=command.help,
                                                   description=command.description or command.help)
        command.arguments(p)
        p.set_defaults(handler=command.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return run_guarded(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
