"""`raybind submit PIPELINE --config ... [--follow]` and `raybind jobs list|logs|stop`: any raybind
pipeline as a Ray Job on the cluster `raybind cluster up` started (or any cluster: `--address`).

The job's entrypoint is the same CLI (`python -m pipelines.cli.job_entry PIPELINE --config ... --set ...`),
run by the job server with `runtime_env = {working_dir: <this repo>, env_vars: {MLFLOW_TRACKING_URI,
RAYBIND_HOME, RAY_AUTH_TOKEN_PATH ...}}`. The config is loaded and validated here first, so a typo
fails in one line before anything is uploaded. Every request carries `Authorization: Bearer <token>`
from the token file: the job server refuses requests without it.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.core import tracking, workspace
from pipelines.core.config import load_config
from pipelines.core.errors import OperationalError
from pipelines.ops import cluster

REPO = workspace.REPO
# Never uploaded: the venv, local state, VCS data, stray MLflow stores (also .gitignore'd; explicit
# here because a copy of the repo may have no .gitignore).
UPLOAD_EXCLUDES = [".venv", ".raybind", ".git", "mlruns", "mlartifacts", "*.db", "**/__pycache__",
                   ".pytest_cache", ".ruff_cache", "*.egg-info"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobFailedError(OperationalError):
    """A submitted job ended FAILED or STOPPED; the message holds its last log lines."""


@dataclass(frozen=True)
class SubmitRequest:
    pipeline: tuple[str, ...]  # ("pretrain",), ("index", "build"), ("nightly",) ...
    config: str | None = None
    overrides: tuple[str, ...] = ()
    follow: bool = False
    submission_id: str | None = None
    address: str = ""  # "" = the local cluster's dashboard from .raybind/cluster/state.json
    env: dict[str, str] = field(default_factory=dict)  # extra env vars for the job
    config_cls: type | None = None  # the pipeline's config class: the config is validated before submitting
    default_config: str | None = None  # its default config file, when `config` is None


# ----------------------------------------------------------------------------- cluster connection
def target(address: str = "") -> tuple[str, dict[str, str], dict]:
    """(dashboard URL, auth headers, state) of the cluster to talk to."""
    import os

    state = cluster.read_state() or {}
    url = address or os.environ.get("RAY_API_SERVER_ADDRESS") or state.get("dashboard_url", "")
    if not url:
        raise cluster.ClusterError(f"no cluster to submit to: {cluster.state_path()} does not exist and no "
                                   "--address / $RAY_API_SERVER_ADDRESS is set; run `raybind cluster up`")
    if state and url.rstrip("/") == state.get("dashboard_url"):
        return url, cluster.auth_headers(state), state
    return url, token_headers(), {}  # another cluster: none of the local cluster's settings apply


def token_headers() -> dict[str, str]:
    """For a cluster that is not ours: the token from $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH."""
    import os

    token = os.environ.get("RAY_AUTH_TOKEN", "")
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_client(state: dict | None = None, address: str = ""):
    from ray.job_submission import JobSubmissionClient

    if state is not None and not address:
        return cluster.job_client(state)
    url, headers, _ = target(address)
    return JobSubmissionClient(url, headers=headers)


# ----------------------------------------------------------------------------- submission
def config_argument(path: str | None) -> str | None:
    """The config path as the job sees it: relative to the repo (uploaded as working_dir) when it
    is inside, else absolute (fine on a local cluster, which shares this filesystem)."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO))
    except ValueError:
        return str(resolved)


def entrypoint(req: SubmitRequest) -> str:
    args = ["python", "-m", "pipelines.cli.job_entry", *req.pipeline]
    if req.config:
        args += ["--config", config_argument(req.config)]
    for item in req.overrides:
        args += ["--set", item]
    return " ".join(shlex.quote(a) for a in args)


def runtime_env(state: dict, extra: dict[str, str]) -> dict:
    env = {"RAYBIND_HOME": str(workspace.home()), "PYTHONUNBUFFERED": "1"}
    if state:
        # The token's *path* only: env vars of a job are visible to anyone who can list jobs.
        env.update({"MLFLOW_TRACKING_URI": state["mlflow_uri"], "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": state["token_path"]})
    env.update(extra)
    return {"working_dir": str(REPO), "excludes": UPLOAD_EXCLUDES, "env_vars": env}


def submit(req: SubmitRequest) -> dict:
    """Validate the config, submit the job, print its id and how to follow it; optionally follow."""
    if req.config_cls is not None:  # fail here, not on the cluster
        load_config(req.config_cls, req.config or req.default_config, req.overrides)
    url, headers, state = target(req.address)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url, headers=headers)
    command = entrypoint(req)
    job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env(state, req.env),
                               submission_id=req.submission_id,
                               metadata={"raybind.pipeline": " ".join(req.pipeline),
                                         # the uploaded working_dir has no .git: keep the commit here
                                         "raybind.git_commit": tracking.git_commit()})
    print(f"submitted {job_id} to {url}: {command}", flush=True)
    print(f"  follow: raybind jobs logs {job_id} --follow    stop: raybind jobs stop {job_id}", flush=True)
    summary = {"job": "submit", "job_id": job_id, "address": url, "entrypoint": command}
    if req.follow:
        summary["status"] = follow(client, job_id)
    return summary


def follow(client, job_id: str, tail_lines: int = 30) -> str:
    """Stream the job's logs until it ends; JobFailedError (with its last lines) unless it succeeded."""
    async def stream():
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(stream())
    except RuntimeError as exc:  # the log websocket can close early; the status below is what counts
        print(f"(log stream ended: {exc})", file=sys.stderr)
    return wait_terminal(client, job_id, tail_lines)


def wait_terminal(client, job_id: str, tail_lines: int = 30, timeout_s: float | None = None) -> str:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(1.0)
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        last = "\n".join(client.get_job_logs(job_id).rstrip().splitlines()[-tail_lines:])
        raise JobFailedError(f"job {job_id} {status}: {info.message or ''}\n--- last {tail_lines} log lines ---\n"
                             f"{last}")
    print(f"job {job_id} SUCCEEDED", flush=True)
    return status


# ----------------------------------------------------------------------------- jobs list | logs | stop
def list_jobs(address: str = "", limit: int = 20) -> list[dict]:
    """Newest first: id, status, pipeline, start / end time, entrypoint."""
    rows = []
    for job in job_client(address=address).list_jobs():
        rows.append({"id": job.submission_id or job.job_id, "status": str(job.status.value),
                     "pipeline": (job.metadata or {}).get("raybind.pipeline", ""),
                     "start": fmt_ms(job.start_time), "end": fmt_ms(job.end_time),
                     "entrypoint": job.entrypoint, "message": job.message or ""})
    rows.sort(key=lambda r: r["start"], reverse=True)
    return rows[:limit]


def fmt_ms(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""


def print_jobs(rows: list[dict]) -> None:
    if not rows:
        print("no jobs")
        return
    print(f"{'JOB ID':<28} {'STATUS':<10} {'PIPELINE':<14} {'STARTED':<20} ENTRYPOINT")
    for r in rows:
        print(f"{r['id']:<28} {r['status']:<10} {r['pipeline']:<14} {r['start']:<20} {r['entrypoint'][:60]}")


def job_logs(job_id: str, follow_logs: bool = False, address: str = "") -> str:
    client = job_client(address=address)
    if follow_logs:
        return follow(client, job_id)
    sys.stdout.write(client.get_job_logs(job_id))
    return str(client.get_job_status(job_id).value)


def stop_job(job_id: str, address: str = "", timeout_s: float = 60.0) -> str:
    client = job_client(address=address)
    if not client.stop_job(job_id):
        status = str(client.get_job_status(job_id).value)
        print(f"job {job_id} was not running ({status})")
        return status
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"job {job_id}: {status}")
    return status
