"""MLflow for every job: where the store is, one run per job (reopened on resume), lineage tags.

The tracking URI comes from the job config, else $MLFLOW_TRACKING_URI, else a local sqlite store in
the work folder (`.raybind/mlflow/mlflow.db`, artifacts beside it). Training workers log through an
`MlflowClient` with the run id, so nothing depends on a process-global active run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipelines.core import workspace

RUN_NAME_TAG = "raybind.run_name"
INTERRUPTED_TAG = "raybind.interrupted_attempts"  # attempts whose driver died before ending the run


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI or the local store under .raybind/mlflow
    experiment: str = "raybind"
    registered_model: str = "raybind-shapesworld"  # "" = do not register


def local_store() -> tuple[str, str]:
    """(tracking URI, artifact location) of the default local store."""
    root = workspace.subdir("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def resolve_uri(cfg: TrackingConfig) -> str:
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store()[0]


def configure(cfg: TrackingConfig) -> str:
    """Point the mlflow module at the store (and make sure the experiment exists). Returns the URI."""
    import mlflow

    uri = resolve_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        artifact_location = local_store()[1] if uri == local_store()[0] else None
        mlflow.create_experiment(cfg.experiment, artifact_location=artifact_location)
    mlflow.set_experiment(cfg.experiment)
    return uri


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "0.001", ...} (MLflow params are flat strings, <= 6000 chars)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return {k: v[:6000] for k, v in out.items()}


def find_run(cfg: TrackingConfig, run_name: str) -> str | None:
    """The id of the newest run of this experiment with tag raybind.run_name = run_name."""
    import mlflow

    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return None
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None


def git_commit() -> str:
    repo = workspace.REPO
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def hash_strings(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def lineage_tags(shards: list[str], manifest: str | None, resources: Mapping[str, float]) -> dict[str, str]:
    return {
        "raybind.git_commit": git_commit(),
        "raybind.shards_hash": hash_strings(sorted(shards)),
        "raybind.num_shards": str(len(shards)),
        "raybind.manifest": manifest or "",
        "raybind.ray_resources": json.dumps({k: v for k, v in sorted(resources.items())
                                             if not k.startswith("node:")}),
    }


def ui_command(uri: str) -> str:
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri}"


def open_job_run(cfg: TrackingConfig, run_name: str, job: str, config: dict[str, Any],
                 tags: Mapping[str, str]) -> str:
    """Create the run of `run_name`, or reopen it to resume; returns its id. It stays RUNNING until
    the job ends it.

    An earlier attempt whose driver died left its run RUNNING (nothing could end it): it is
    recorded as killed, with a tag counting the interrupted attempts, before this attempt reopens it.
    """
    import mlflow
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run_id = find_run(cfg, run_name)
    if run_id is None:
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        run = client.create_run(experiment.experiment_id, run_name=run_name)
        run_id = run.info.run_id
        client.log_dict(run_id, config, f"config/{job}.yaml")
        params = [Param(k, str(v)) for k, v in flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            client.log_batch(run_id, params=params[start:start + 100])
    else:
        run = client.get_run(run_id)
        if run.info.status == "RUNNING":  # its driver died; this attempt takes over
            attempts = int(run.data.tags.get(INTERRUPTED_TAG, "0")) + 1
            client.set_terminated(run_id, "KILLED")
            client.set_tag(run_id, INTERRUPTED_TAG, str(attempts))
        client.update_run(run_id, status="RUNNING")
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in {RUN_NAME_TAG: run_name, "raybind.job": job,
                                                                **tags}.items()])
    return run_id
