"""Start or join Ray the same way everywhere: loopback-only, temp dir in the work folder.

Why the environment variables (measured on Ray 2.60, see docs/architecture.md):
- Ray binds the machine's address by default; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes a local
  cluster bind and advertise 127.0.0.1 only.
- Ray >= 2.59 turns token auth on for local clusters. A throwaway in-process cluster
  (`ray.init()` with no address) runs with auth off; `raybind cluster up` keeps it on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.core import workspace

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


MAX_TMPDIR_CHARS = 40  # Ray puts AF_UNIX sockets ~65 characters below it; Linux allows 107


def ray_tmpdir() -> str:
    """`.raybind/ray`, or a short /tmp folder named after it when that path is too long for sockets."""
    path = str(workspace.subdir("ray"))
    if len(path) <= MAX_TMPDIR_CHARS:
        return path
    short = f"/tmp/raybind-{hashlib.sha256(path.encode()).hexdigest()[:10]}"
    os.makedirs(short, exist_ok=True)
    return short


def apply_local_env() -> None:
    """Set the loopback / no-telemetry variables for this process and the workers it starts."""
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_TMPDIR", ray_tmpdir())


def import_torch_first() -> None:
    """Ray worker setup hook: import torch on the worker's main thread before anything else runs.

    Why: a Ray worker runs Python threads of its own (Ray Data iterators, Train's training thread,
    actor calls). When two of them import torch for the first time at once, Python's import-deadlock
    breaker hands one of them a half-initialised module ("partially initialized module 'torch' has
    no attribute 'types'"); CI hit exactly that inside Ray Data decode tasks. Importing it here, once,
    before any task or thread starts, removes the race for every worker of the cluster.
    """
    import torch  # noqa: F401


def quiet_ray_train_internals() -> None:
    """Silence Ray Train v2's PlacementGroupCleaner warnings (errors still show), and the tracebacks
    of its internal warnings that say they are safe to ignore.

    Why: it asks the State API, which the dashboard serves, whether the train controller is alive,
    about once a second. The local cluster here runs without a dashboard, so each check logged
    "Failed to query Ray Train Controller actor state" (hundreds of lines per demo run). What it
    guards against (a dead controller's placement group left behind) cannot be checked without the
    API either way, and a local cluster ends with its driver.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    # Its monitor thread also dies with a traceback when the State API cannot tell which cluster it
    # is in (another Ray instance runs on the same machine): one line instead.
    default_hook = threading.excepthook

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread.name == "PlacementGroupCleanerMonitor":
            logging.getLogger("raybind").warning("Ray Train's placement group monitor stopped: %s", args.exc_value)
            return
        default_hook(args)

    threading.excepthook = excepthook
    # On a loaded machine the train controller's resource request to Ray's autoscaling coordinator
    # can time out; Ray logs that as a warning it calls safe to ignore, with a full traceback. Keep
    # the warning, drop the traceback.
    logging.getLogger("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
                      ).addFilter(_without_traceback)


def _without_traceback(record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text = None, None
    return True


def setup_worker() -> None:
    """Ray worker setup hook for the local clusters ensure_ray starts."""
    import_torch_first()
    quiet_ray_train_internals()


def refresh_auth_from_env() -> None:
    """Make Ray read RAY_AUTH_MODE / RAY_AUTH_TOKEN(_PATH) again before it connects.

    Why: Ray reads them once, when `ray` is imported. A job that learns its cluster later (the
    nightly job joins the local cluster from its state file) sets them after that, and its
    connection was then refused for a missing token. This is how Ray's own tests switch modes.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Connect to `address` (or $RAY_ADDRESS) if given, else start an in-process local cluster.

    Idempotent: does nothing when Ray is already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return
    apply_local_env()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        refresh_auth_from_env()
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Keep two spare idle workers rather than the default num_cpus: otherwise, at every read-task
    # boundary Ray starts a worker (~0.7 s of CPU importing torch and PyAV) that is surplus a moment
    # later and killed after 1 s idle (measured in benchmarks/data_throughput.py).
    os.environ.setdefault("RAY_num_workers_soft_limit", str((num_cpus or os.cpu_count() or 1) + 2))
    ray.init(
        num_cpus=num_cpus,
        runtime_env={"worker_process_setup_hook": setup_worker},
        include_dashboard=False,
        _temp_dir=os.environ["RAY_TMPDIR"],
        configure_logging=True,
        logging_level="WARNING",
    )


def run_tasks(fn: Callable[..., Any], calls: Sequence[tuple], desc: str, env: dict[str, str] | None = None,
              num_cpus: float = 1, max_retries: int = 2) -> list[Any]:
    """Run `fn(*args)` for each `args` in `calls` as Ray tasks; results in completion order, with a
    progress bar on stderr. `env` goes to the tasks' workers (e.g. an S3 endpoint set after they started)."""
    import ray
    from tqdm import tqdm

    task = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
    if env:
        task = task.options(runtime_env={"env_vars": env})
    pending = [task.remote(*args) for args in calls]
    results: list[Any] = []
    with tqdm(total=len(pending), desc=desc, unit="shard") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.extend(ray.get(done))
            bar.update(len(done))
    return results
