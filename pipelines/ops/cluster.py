"""`raybind cluster up|down|status|env`: a local Ray head and an `mlflow server`, both on 127.0.0.1.

    raybind cluster up            # Ray head (token auth) + MLflow server; addresses -> .raybind/cluster/state.json
    eval "$(raybind cluster env)" # point every later command (and `ray job ...`) at them
    raybind cluster status        # alive? reachable? (exit 1 when not up)
    raybind cluster down          # stops only the processes `up` started

Why this shape:
- Token auth (`RAY_AUTH_MODE=token`, Ray >= 2.52) stays on: the dashboard / job server then refuses
  any request without `Authorization: Bearer <token>`. The token is generated once into
  `<work folder>/cluster/ray_token` (mode 0600) and handed to Ray through `RAY_AUTH_TOKEN_PATH`, so it
  never sits in a command line, a job's runtime_env or the state file (which stores only its path).
- `ray start --block` and `mlflow server` run in their own sessions (`start_new_session`): `down`
  stops exactly the processes of those sessions. `ray stop` would kill every Ray on the machine.
- Every port is picked free unless configured, so several clusters (tests, users) can share a host.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipelines.core import workspace
from pipelines.core.config import require
from pipelines.core.errors import OperationalError
from pipelines.core.ray_runtime import LOOPBACK_ENV, ray_tmpdir

STATE_FILE = "state.json"
TOKEN_FILE = "ray_token"


class ClusterError(OperationalError):
    """The local cluster is not up, or did not come up (the message says which part and where its log is)."""


@dataclass(frozen=True)
class ClusterConfig:
    num_cpus: int = 0  # 0 = every core of the machine
    ray_port: int = 0  # GCS port; 0 = a free port
    dashboard_port: int = 0  # dashboard + job server; 0 = a free port
    mlflow_port: int = 0  # 0 = a free port
    mlflow_backend: str = ""  # "" = sqlite:///<work folder>/mlflow/mlflow.db (the store jobs use without a server)
    mlflow_artifacts: str = ""  # "" = <work folder>/mlflow/artifacts; or s3://bucket/prefix
    timeout_s: float = 240.0  # how long to wait for both servers (a loaded 2-core machine needs ~40 s)

    def __post_init__(self):
        require(self.num_cpus >= 0, "num_cpus", "must be >= 0 (0 = all cores)")
        for name in ("ray_port", "dashboard_port", "mlflow_port"):
            require(0 <= getattr(self, name) < 65536, name, "must be a port number (0 = pick a free one)")
        require(self.timeout_s > 0, "timeout_s", "must be > 0")


@dataclass(frozen=True)
class DownConfig:
    timeout_s: float = 5.0  # SIGTERM first, SIGKILL what is left after this long (Ray leaves some running)


@dataclass(frozen=True)
class StatusConfig:
    pass


# ----------------------------------------------------------------------------- state and token
def cluster_dir() -> Path:
    return workspace.subdir("cluster")


def state_path() -> Path:
    return cluster_dir() / STATE_FILE


def read_state() -> dict | None:
    path = state_path()
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ClusterError(f"{path}: not valid JSON ({exc}); delete it or run `raybind cluster down`") from exc


def require_state() -> dict:
    state = read_state()
    if state is None:
        raise ClusterError(f"no local cluster: {state_path()} does not exist; start one with `raybind cluster up`")
    return state


def ensure_token() -> Path:
    """The cluster's Ray token file (created once, mode 0600)."""
    path = cluster_dir() / TOKEN_FILE
    if not path.is_file() or not path.read_text().strip():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def read_token(state: dict) -> str:
    return Path(state["token_path"]).read_text().strip()


def auth_headers(state: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {read_token(state)}"}


def client_env(state: dict) -> dict[str, str]:
    """What a client (driver, `ray job` CLI, MLflow client) needs to use this cluster. No secrets:
    the token is passed by the path of its file."""
    return {"RAY_ADDRESS": state["ray_address"], "RAY_API_SERVER_ADDRESS": state["dashboard_url"],
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["token_path"],
            "MLFLOW_TRACKING_URI": state["mlflow_uri"], "RAYBIND_HOME": str(workspace.home())}


# ----------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`: what one `up` started, and nothing else."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            pids.append(int(proc.name))
    return pids


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> int:
    """Start `cmd` in a new session (its pid is the session id), output to `log`."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=workspace.home())
    return proc.pid


def stop_session(sid: int, timeout_s: float) -> int:
    """SIGTERM every process of the session, SIGKILL the rest after `timeout_s`. Returns how many."""
    pids = session_pids(sid)
    for pid in pids:
        with _ignore_gone():
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.3)
    for pid in session_pids(sid):
        with _ignore_gone():
            os.kill(pid, signal.SIGKILL)
    return len(pids)


class _ignore_gone:
    def __enter__(self):
        return self

    def __exit__(self, tp, value, tb):
        return tp is ProcessLookupError


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 3.0) -> int:
    """HTTP status of a GET (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return 0


def venv_path_env() -> dict[str, str]:
    """The environment of the servers: this interpreter's bin first on PATH, so a job's `python`
    and `raybind` are the project's; loopback-only Ray; no telemetry."""
    env = dict(os.environ, **LOOPBACK_ENV)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAYBIND_HOME"] = str(workspace.home())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def mlflow_command(cfg: ClusterConfig, port: int) -> tuple[list[str], str, str]:
    """(argv, backend URI, artifacts destination) of the MLflow server."""
    store = workspace.subdir("mlflow")
    backend = cfg.mlflow_backend or f"sqlite:///{store / 'mlflow.db'}"
    artifacts = cfg.mlflow_artifacts or str(store / "artifacts")
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    argv = [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", backend, "--artifacts-destination", artifacts]
    return argv, backend, artifacts


def ray_command(cfg: ClusterConfig, ports: dict[str, int]) -> list[str]:
    """`ray start --head --block` bound to 127.0.0.1 with every port explicit (defaults such as the
    dashboard agent's 52365 collide with any other Ray on the host, and the job server then has
    no agent: "No available agent to submit job")."""
    exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    argv = [exe, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(ports["ray"]),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]),
            "--temp-dir", ray_tmpdir(), "--disable-usage-stats"]
    for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                 "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port"):
        argv += [f"--{flag}", str(ports[flag])]
    if cfg.num_cpus:
        argv += ["--num-cpus", str(cfg.num_cpus)]
    return argv


def pick_ports(cfg: ClusterConfig) -> dict[str, int]:
    ports = {"ray": cfg.ray_port or free_port(), "dashboard": cfg.dashboard_port or free_port(),
             "mlflow": cfg.mlflow_port or free_port()}
    for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                 "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port"):
        ports[flag] = free_port()
    return ports


def wait_ready(state: dict, timeout_s: float) -> None:
    """Until MLflow's /health and the job server answer (with the token), or a ClusterError naming the
    part that did not come up and its log."""
    deadline = time.monotonic() + timeout_s
    checks = {"mlflow": (f"{state['mlflow_uri']}/health", {}),
              "ray": (f"{state['dashboard_url']}/api/jobs/", auth_headers(state))}
    pending = dict(checks)
    while pending:
        for part, (url, headers) in list(pending.items()):
            if not session_pids(state[part]["sid"]):
                raise ClusterError(f"{part} exited while starting; see {state[part]['log']}")
            if http_status(url, headers) == 200:
                where = state["dashboard_url"] if part == "ray" else state["mlflow_uri"]
                print(f"  {part} ready ({where})", flush=True)
                del pending[part]
        if pending and time.monotonic() > deadline:
            parts = ", ".join(f"{p} (log: {state[p]['log']})" for p in pending)
            raise ClusterError(f"not ready after {timeout_s:.0f} s: {parts}")
        time.sleep(0.5)



# ----------------------------------------------------------------------------- the commands
def is_up(state: dict) -> dict[str, bool]:
    return {part: bool(session_pids(state[part]["sid"])) for part in ("ray", "mlflow")}


def cluster_up(cfg: ClusterConfig) -> dict:
    """Start the Ray head and the MLflow server (or report the running ones); write the state file."""
    started = time.perf_counter()
    old = read_state()
    if old is not None:
        alive = is_up(old)
        if all(alive.values()):
            print(f"raybind cluster: already up (state: {state_path()})", flush=True)
            return {**cluster_status(StatusConfig()), "job": "cluster up", "started": False}
        print(f"raybind cluster: stale state {state_path()} (alive: {alive}); stopping what is left", flush=True)
        cluster_down(DownConfig())
    ports = pick_ports(cfg)
    token_path = ensure_token()
    logs = workspace.subdir("logs")
    env = venv_path_env()
    mlflow_argv, backend, artifacts = mlflow_command(cfg, ports["mlflow"])
    state = {"ray_address": f"127.0.0.1:{ports['ray']}", "dashboard_url": f"http://127.0.0.1:{ports['dashboard']}",
             "mlflow_uri": f"http://127.0.0.1:{ports['mlflow']}", "token_path": str(token_path),
             "mlflow_backend": backend, "mlflow_artifacts": artifacts, "ports": ports,
             "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(f"raybind cluster: starting MLflow on {state['mlflow_uri']} and Ray on {state['ray_address']} "
          f"(dashboard {state['dashboard_url']}, token auth)", flush=True)
    mlflow_env = dict(env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # 0.5 GB instead of 1.7 GB
    state["mlflow"] = {"sid": spawn(mlflow_argv, mlflow_env, logs / "cluster-mlflow.log"),
                       "log": str(logs / "cluster-mlflow.log")}
    # The head (and so every job driver and worker it starts) uses the cluster's MLflow by default.
    ray_env = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
                   MLFLOW_TRACKING_URI=state["mlflow_uri"])
    ray_env.pop("RAY_AUTH_TOKEN", None)
    ray_env.pop("RAY_ADDRESS", None)
    state["ray"] = {"sid": spawn(ray_command(cfg, ports), ray_env, logs / "cluster-ray.log"),
                    "log": str(logs / "cluster-ray.log"), "temp_dir": ray_tmpdir()}
    state_path().write_text(json.dumps(state, indent=1))  # now `down` can stop them, even if waiting fails
    try:
        wait_ready(state, cfg.timeout_s)
    except ClusterError:
        cluster_down(DownConfig(timeout_s=10))
        raise
    print(f'raybind cluster: up in {time.perf_counter() - started:.0f} s. Use it from this shell: '
          f'eval "$(raybind cluster env)"', flush=True)
    return {"job": "cluster up", "started": True, **public(state), "seconds": round(time.perf_counter() - started, 1)}


def public(state: dict) -> dict:
    return {k: state[k] for k in ("ray_address", "dashboard_url", "mlflow_uri", "token_path",
                                  "mlflow_backend", "mlflow_artifacts")}


def cluster_down(cfg: DownConfig) -> dict:
    """Stop the processes `up` started (their sessions only) and remove the state file."""
    state = read_state()
    if state is None:
        print("raybind cluster: nothing to stop (no state file)", flush=True)
        return {"job": "cluster down", "stopped": {}}
    stopped = {}
    for part in ("ray", "mlflow"):  # Ray first: its jobs may still be logging to MLflow
        stopped[part] = stop_session(state[part]["sid"], cfg.timeout_s)
        print(f"  {part}: stopped {stopped[part]} process(es)", flush=True)
    state_path().unlink(missing_ok=True)
    return {"job": "cluster down", "stopped": stopped}


def cluster_status(cfg: StatusConfig) -> dict:
    """Processes alive, servers answering (the job server with the token), jobs by status."""
    state = require_state()
    alive = is_up(state)
    ray_http = http_status(f"{state['dashboard_url']}/api/jobs/", auth_headers(state))
    ray_http_no_token = http_status(f"{state['dashboard_url']}/api/jobs/")
    mlflow_http = http_status(f"{state['mlflow_uri']}/health")
    summary = {"job": "cluster status", "up": all(alive.values()) and ray_http == 200 and mlflow_http == 200,
               **public(state), "alive": alive, "job_server_http": ray_http,
               "job_server_without_token_http": ray_http_no_token, "mlflow_http": mlflow_http,
               "started_at": state.get("started_at", "")}
    if ray_http == 200:

        jobs = job_client(state).list_jobs()
        counts: dict[str, int] = {}
        for job in jobs:
            counts[str(job.status)] = counts.get(str(job.status), 0) + 1
        summary["jobs"] = counts
    if not summary["up"]:
        raise ClusterError(f"the local cluster is not healthy: processes alive {alive}, job server HTTP "
                           f"{ray_http}, MLflow HTTP {mlflow_http}; logs: {state['ray']['log']}, "
                           f"{state['mlflow']['log']}; `raybind cluster down` then `up` restarts it")
    return summary


def env_lines(state: dict) -> list[str]:
    import shlex

    return [f"export {k}={shlex.quote(v)}" for k, v in client_env(state).items()]


def job_client(state: dict):
    """A Ray Jobs client for this cluster, with its token."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(state["dashboard_url"], headers=auth_headers(state))
