"""`raybind schedule install`: a cron entry that submits the nightly job to the local cluster.

    raybind schedule install --print                    # show the line
    raybind schedule install                            # add / replace it in the user's crontab
    raybind schedule install --cron-file /etc/cron.d/raybind   # a system cron file instead

The entry runs `raybind submit nightly --config ... --follow` from the repo with the venv's
`raybind`, so the night runs as a Ray Job on the cluster (visible in `raybind jobs list`), its exit
code is the job's, and its output lands in <work folder>/logs/nightly-cron.log. Overlap is refused
twice: `flock -n` around the entry and the nightly job's own lock. The line carries a marker
comment, so installing again replaces it instead of adding a second one.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipelines.core import workspace

MARKER = "# raybind-nightly"
REPO = workspace.REPO


@dataclass(frozen=True)
class ScheduleRequest:
    cron: str = "0 2 * * *"
    config: str = "configs/nightly.yaml"
    print_only: bool = False
    cron_file: str = ""  # a cron.d style file (with a user column) instead of the crontab


def check_cron(expr: str) -> None:
    fields = expr.split()
    if len(fields) != 5 and not (len(fields) == 1 and fields[0].startswith("@")):
        raise ValueError(f"--cron: {expr!r} is not a cron schedule (5 fields like '0 2 * * *', or @daily)")
    allowed = set("0123456789*/,-")
    for f in fields:
        if not f.startswith("@") and not set(f) <= allowed:
            raise ValueError(f"--cron: field {f!r} of {expr!r} has characters cron does not accept")


def cron_command(config: str) -> str:
    """The shell command of the entry: absolute paths only (cron has no PATH worth the name)."""
    home = workspace.home()
    raybind = Path(sys.executable).parent / "raybind"
    cfg = Path(config) if Path(config).is_absolute() else REPO / config
    if not cfg.is_file():
        raise FileNotFoundError(f"--config: {cfg} does not exist")
    log = workspace.subdir("logs") / "nightly-cron.log"
    lock = workspace.subdir("locks") / "nightly-cron.lock"
    inner = (f"cd {shlex.quote(str(REPO))} && RAYBIND_HOME={shlex.quote(str(home))} "
             f"{shlex.quote(str(raybind))} submit nightly --config {shlex.quote(str(cfg))} --follow")
    return f"flock -n {shlex.quote(str(lock))} sh -c {shlex.quote(inner)} >> {shlex.quote(str(log))} 2>&1"


def cron_line(req: ScheduleRequest, with_user: bool = False) -> str:
    check_cron(req.cron)
    user = f" {Path.home().owner()}" if with_user else ""
    return f"{req.cron}{user} {cron_command(req.config)} {MARKER}"


def merged_crontab(current: str, line: str) -> str:
    """The crontab with our entry replaced (or added); other entries untouched."""
    kept = [entry for entry in current.splitlines() if not entry.rstrip().endswith(MARKER)]
    return "\n".join([*kept, line]) + "\n"


def install(req: ScheduleRequest) -> str:
    line = cron_line(req, with_user=bool(req.cron_file))
    if req.print_only:
        print(line)
        return line
    if req.cron_file:
        path = Path(req.cron_file)
        current = path.read_text() if path.is_file() else ""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(merged_crontab(current, line))
        print(f"schedule: wrote {path}:\n{line}")
        return line
    crontab = shutil.which("crontab")
    if crontab is None:
        raise FileNotFoundError("schedule: no `crontab` on this machine; use --print and add the line to your "
                                "scheduler, or --cron-file /etc/cron.d/raybind")
    listed = subprocess.run([crontab, "-l"], capture_output=True, text=True)
    current = listed.stdout if listed.returncode == 0 else ""  # exit 1 = no crontab yet
    subprocess.run([crontab, "-"], input=merged_crontab(current, line), text=True, check=True)
    print(f"schedule: installed in the crontab of {Path.home().owner()}:\n{line}")
    return line
