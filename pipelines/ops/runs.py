"""`raybind runs list|show`: recent MLflow runs, their headline metrics, and the registered models'
versions and aliases, for a terminal. A thin layer over `MlflowClient`; the store is the one every job
uses (--tracking-uri, else $MLFLOW_TRACKING_URI, else the local cluster's server, else the local store).
"""

from __future__ import annotations

import os
import time

from pipelines.core import tracking
from pipelines.ops.cluster import read_state

HEADLINE = ("eval/text_to_video/R_at_1", "eval/text_to_image/R_at_1", "train/loss", "candidate/mean_R_at_1",
            "champion/mean_R_at_1", "promoted")


def tracking_uri(explicit: str = "") -> str:
    if explicit or os.environ.get("MLFLOW_TRACKING_URI"):
        return explicit or os.environ["MLFLOW_TRACKING_URI"]
    state = read_state()
    return state["mlflow_uri"] if state else tracking.local_store()[0]


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def fmt_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else ""


def registered_models(c) -> list[dict]:
    out = []
    for model in c.search_registered_models(max_results=50):
        versions = c.search_model_versions(f"name = '{model.name}'", max_results=200)
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        out.append({"name": model.name, "versions": [
            {"version": v.version, "aliases": sorted(aliases.get(str(v.version), [])), "run_id": v.run_id,
             "created": fmt_time(v.creation_timestamp)}
            for v in sorted(versions, key=lambda v: int(v.version), reverse=True)[:10]]})
    return out


def list_runs(experiment: str = "raybind", limit: int = 15, job: str = "", uri: str = "") -> dict:
    uri = tracking_uri(uri)
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in c.search_experiments()]
        raise ValueError(f"--experiment: no experiment {experiment!r} at {uri} (have: {', '.join(names) or 'none'})")
    flt = f"tags.`raybind.job` = '{job}'" if job else ""
    runs = c.search_runs([exp.experiment_id], flt, order_by=["attributes.start_time DESC"], max_results=limit)
    rows = [{"run_id": r.info.run_id, "name": r.info.run_name, "job": r.data.tags.get("raybind.job", ""),
             "status": r.info.status, "started": fmt_time(r.info.start_time),
             "metrics": {k: round(v, 4) for k, v in r.data.metrics.items() if k in HEADLINE},
             "decision": r.data.tags.get("raybind.nightly.decision", "")} for r in runs]
    return {"tracking_uri": uri, "experiment": experiment, "runs": rows, "models": registered_models(c)}


def print_runs(report: dict) -> None:
    print(f"runs in {report['experiment']!r} at {report['tracking_uri']} (newest first)")
    print(f"{'RUN ID':<34} {'NAME':<34} {'JOB':<10} {'STATUS':<9} {'STARTED':<17} METRICS")
    for r in report["runs"]:
        metrics = " ".join(f"{k.split('/')[-2] if k.count('/') > 1 else k}={v}" for k, v in r["metrics"].items())
        extra = f"  [{r['decision']}]" if r["decision"] else ""
        print(f"{r['run_id']:<34} {r['name'][:33]:<34} {r['job']:<10} {r['status']:<9} {r['started']:<17} "
              f"{metrics}{extra}")
    for model in report["models"]:
        print(f"\nregistered model {model['name']}:")
        for v in model["versions"]:
            print(f"  v{v['version']:<4} {','.join(v['aliases']) or '-':<28} run {v['run_id']}  {v['created']}")


def show_run(run: str, experiment: str = "raybind", uri: str = "") -> dict:
    """One run by id or by name (the newest run with that name or raybind.run_name)."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(uri)
    c = client(uri)
    try:
        r = c.get_run(run)
    except MlflowException:
        exp = c.get_experiment_by_name(experiment)
        found = []
        for flt in (f"attributes.run_name = '{run}'", f"tags.`{tracking.RUN_NAME_TAG}` = '{run}'"):  # no OR in MLflow
            found = found or ([] if exp is None else c.search_runs(
                [exp.experiment_id], flt, order_by=["attributes.start_time DESC"], max_results=1))
        if not found:
            raise ValueError(f"runs show: no run with id or name {run!r} in {experiment!r} at {uri}") from None
        r = found[0]
    versions = c.search_model_versions(f"run_id = '{r.info.run_id}'")
    artifacts = [a.path for a in c.list_artifacts(r.info.run_id)]
    return {"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
            "started": fmt_time(r.info.start_time), "ended": fmt_time(r.info.end_time),
            "tags": {k: v for k, v in r.data.tags.items() if k.startswith("raybind.")},
            "metrics": dict(sorted(r.data.metrics.items())), "params": len(r.data.params),
            "artifacts": artifacts, "registered": [{"name": v.name, "version": v.version,
                                                    "aliases": list(getattr(v, "aliases", []) or [])}
                                                   for v in versions]}


def print_run(report: dict) -> None:
    print(f"run {report['run_id']} ({report['name']}): {report['status']}, {report['started']} -> {report['ended']}")
    for key, value in report["tags"].items():
        print(f"  tag    {key} = {value[:100]}")
    for key, value in report["metrics"].items():
        print(f"  metric {key} = {value:.4f}")
    print(f"  params: {report['params']}   artifacts: {', '.join(report['artifacts']) or '-'}")
    for v in report["registered"]:
        print(f"  registered {v['name']} v{v['version']} {','.join(v['aliases'])}")
