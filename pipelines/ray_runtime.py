"""Start or join Ray the same way everywhere: loopback-only, temp dir in the work folder.

Why the environment variables (measured on Ray 2.60, see docs/architecture.md):
- Ray binds the machine's address by default; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes a local
  cluster bind and advertise 127.0.0.1 only.
- Ray >= 2.59 turns token auth on for local clusters. A throwaway in-process cluster
  (`ray.init()` with no address) runs with auth off; `raybind cluster up` keeps it on.
"""

from __future__ import annotations

import os

from pipelines import workspace

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def apply_local_env() -> None:
    """Set the loopback / no-telemetry variables for this process and the workers it starts."""
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_TMPDIR", str(workspace.subdir("ray")))


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
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=os.environ["RAY_TMPDIR"],
        configure_logging=True,
        logging_level="WARNING",
    )
