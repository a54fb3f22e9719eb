"""`raybind nightly --config configs/nightly.yaml`: one idempotent night of continued pretraining.

    lock -> newest shards -> already done? -> train from the champion -> evaluate both on the fixed
    held-out set -> gate (every metric >= champion + min_margin) -> promote (champion -> new,
    previous -> old) -> rebuild the search index -> reconfigure the Serve app

- A night is named after its data snapshot (the newest data set under `data.root`: its folder name
  and a hash of its manifest). Its MLflow run (tag `raybind.night`) records every decision and
  number; once that run is FINISHED, running the night again prints the recorded decision and
  changes nothing. New shards make a new night.
- The file lock (`fcntl.flock`, released by the kernel if the process dies) refuses a second night
  while one is running on this machine; on Kubernetes the CronJob's `concurrencyPolicy: Forbid` does
  the same across pods.
- A crashed night resumes: the pretraining run has a fixed name (`nightly-<night>-train`, Ray Train
  resumes it), a model it already registered is reused, and the champion it compared against is read
  back from the night's run, so a promotion that happened before the crash is not judged twice.
- Training starts from the champion's weights and architecture (`models:/NAME/<champion version>`;
  the optimiser and LR schedule start fresh each night). With no champion yet, the first model
  trained becomes it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

from models.reference import RegistryRef
from pipelines.core import storage, tracking, workspace
from pipelines.core.ray_runtime import ensure_ray
from pipelines.eval.evaluate import evaluate_model, flat_metrics
from pipelines.eval.index import build_index
from pipelines.ops.cluster import client_env, is_up, read_state
from pipelines.ops.night_records import (
    alias_version,
    client,
    decide,
    find_night_run,
    log_comparison,
    newest_snapshot,
    night_lock,
    note,
    open_night_run,
)
from pipelines.ops.nightly_config import DECISION_TAG, NIGHT_TAG, Decision, NightlyConfig
from pipelines.ops.serve_roll import reconfigure_serve
from pipelines.registry.model_registry import CANDIDATE, CHAMPION, PREVIOUS, local_model_dir
from pipelines.training.pretrain import PretrainConfig, run_pretrain


# ----------------------------------------------------------------------------- the steps
def pretrain_config(cfg: NightlyConfig, snapshot: str, night: str, champion_dir: str | None) -> PretrainConfig:
    """The configured pretraining, on this night's shards, from the champion (its weights AND its
    architecture, so a config change cannot silently break the warm start)."""
    p = cfg.pretrain
    model = p.model
    if champion_dir:
        model = dataclasses.replace(model, name=str(Path(champion_dir) / "config.json"), init_from=champion_dir)
    return dataclasses.replace(
        p, data=dataclasses.replace(p.data, train=snapshot), model=model, mlflow=cfg.mlflow,
        train=dataclasses.replace(p.train, run_name=train_run_name(night)))


def train_run_name(night: str) -> str:
    """The pretraining's run name (Ray Train storage folder + MLflow tag): fixed per night, so a
    crashed night resumes its training instead of starting over."""
    return f"nightly-{night}-train"


def train_candidate(cfg: NightlyConfig, run_id: str, snapshot: str, night: str, champion: str | None) -> str:
    """The model version this night trained: reused if its pretraining already registered one."""

    name = cfg.mlflow.registered_model
    pre_run = tracking.find_run(cfg.mlflow, train_run_name(night))
    if pre_run is not None:
        versions = client().search_model_versions(f"name = '{name}' and run_id = '{pre_run}'")
        if versions:
            version = str(max(int(v.version) for v in versions))
            note(run_id, f"reusing v{version}, already trained by this night (run {pre_run})")
            return version
    champion_dir = local_model_dir(str(RegistryRef(name, version=champion))) if champion else None
    note(run_id, f"pretraining on {snapshot} from " + (f"champion v{champion}" if champion else "scratch (no champion)"))
    summary = run_pretrain(pretrain_config(cfg, snapshot, night, champion_dir))
    version = summary["registered"]["version"]
    client().set_model_version_tag(name, version, NIGHT_TAG, night)
    note(run_id, f"trained v{version} in {summary['seconds']} s ({summary['steps']} steps, run "
                 f"{summary['mlflow_run_id']})", **{"raybind.nightly.candidate": version,
                                                    "raybind.nightly.pretrain_run": summary["mlflow_run_id"]})
    return version


def evaluate_version(cfg: NightlyConfig, version: str) -> dict[str, float]:
    """Headline + per-pair metrics of a registered version on the fixed held-out set."""

    ensure_ray()
    folder = local_model_dir(str(RegistryRef(cfg.mlflow.registered_model, version=version)))
    d = cfg.data
    report = evaluate_model(folder, heldout_url(cfg), split=d.heldout_split, max_samples=d.max_samples,
                            batch_size=d.batch_size)
    metrics = {**report["headline"], **flat_metrics(report["retrieval"], report["zero_shot"]),
               "samples": float(report["samples"])}
    # What the held-out set cannot measure (no zero-shot without a declaration) is absent, not None:
    # the gate then says the metric is missing.
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def heldout_url(cfg: NightlyConfig) -> str:
    return cfg.data.heldout or str(workspace.home() / "data" / "shapesworld")



def promote(cfg: NightlyConfig, run_id: str, version: str, old: str | None, night: str) -> None:
    """champion -> version; the old champion keeps `previous` (set first: a crash in between leaves
    the old champion serving, never no champion)."""
    name = cfg.mlflow.registered_model
    c = client()
    if old and old != version:
        c.set_registered_model_alias(name, PREVIOUS, old)
    c.set_registered_model_alias(name, CHAMPION, version)
    c.set_model_version_tag(name, version, "raybind.promoted_by_night", night)
    note(run_id, f"promoted v{version} to @{CHAMPION}" + (f"; v{old} is @{PREVIOUS}" if old else ""))


def rebuild_index(cfg: NightlyConfig, run_id: str, version: str, snapshot: str) -> str:
    """A fresh index for the new champion, in its own folder (<root>/v<version>), so the one being
    served is never overwritten underneath the Searcher. Returns its location."""

    ix = cfg.index
    out = storage.join(ix.root or str(workspace.subdir("index") / "nightly"), f"v{version}")
    summary = build_index(str(RegistryRef(cfg.mlflow.registered_model, version=version)), ix.data or snapshot, out,
                          batch_size=ix.batch_size, concurrency=ix.concurrency,
                          num_cpus_per_actor=ix.num_cpus_per_actor, read_cpus_per_task=ix.read_cpus_per_task,
                          overwrite=True, tracking_uri=tracking.resolve_uri(cfg.mlflow))
    note(run_id, f"index rebuilt at {out}: {summary['rows']} rows in {summary['seconds']} s",
         **{"raybind.nightly.index": out})
    return out


# ----------------------------------------------------------------------------- the job
def use_local_cluster() -> None:
    """Run on the local cluster when `raybind cluster up` started one and nothing else is configured."""

    state = read_state()
    if state and not os.environ.get("RAY_ADDRESS") and all(is_up(state).values()):
        for key, value in client_env(state).items():
            os.environ.setdefault(key, value)


def finished_night(cfg: NightlyConfig, night: str) -> dict | None:
    """The recorded outcome of a night that already finished, or None."""
    run = find_night_run(cfg, night)
    if run is None or run.info.status != "FINISHED" or DECISION_TAG not in run.data.tags:
        return None
    tags = run.data.tags
    return {"job": "nightly", "night": night, "decision": "already done", "recorded_decision": tags[DECISION_TAG],
            "mlflow_run_id": run.info.run_id, "candidate": tags.get("raybind.nightly.candidate", ""),
            "champion": alias_version(cfg.mlflow.registered_model, CHAMPION)}


def release_ray_handles() -> None:
    """Finalise the reader's stats handles now, while Ray is connected. Left to interpreter teardown,
    their finaliser calls into Ray after `ray.shutdown()`, Ray re-initialises from $RAY_ADDRESS and
    the process hangs on exit (Ray 2.60; see pipelines/cli/job_entry.py)."""
    import gc

    gc.collect()


def run_nightly(cfg: NightlyConfig) -> dict:
    started = time.perf_counter()
    with night_lock(cfg.lock_file) as lock:
        if cfg.lock_only:
            print(f"nightly: holding {lock}; lock_only set, nothing else to do", flush=True)
            return {"job": "nightly", "lock": str(lock), "decision": "lock only"}
        use_local_cluster()
        tracking.configure(cfg.mlflow)
        snapshot, night = newest_snapshot(cfg.data.root or str(workspace.home() / "data" / "nightly"))
        done = finished_night(cfg, night)
        if done is not None:
            print(f"nightly: night {night} already finished ({done['recorded_decision']}, run "
                  f"{done['mlflow_run_id']}); nothing to do", flush=True)
            return done
        run_id, before = open_night_run(cfg, night, snapshot)
        try:
            summary = run_night(cfg, run_id, snapshot, night, before)
        except BaseException as exc:
            note(run_id, f"failed: {type(exc).__name__}: {exc}")
            client().set_terminated(run_id, "FAILED")
            raise
        client().set_terminated(run_id, "FINISHED")
    release_ray_handles()
    summary.update({"mlflow_run_id": run_id, "seconds": round(time.perf_counter() - started, 1)})
    return summary


def run_night(cfg: NightlyConfig, run_id: str, snapshot: str, night: str, before: str | None) -> dict:
    """Train, compare, and act on the decision; every step is noted on the night's run."""
    name = cfg.mlflow.registered_model
    candidate = train_candidate(cfg, run_id, snapshot, night, before)
    summary = {"job": "nightly", "night": night, "data": snapshot, "candidate": candidate, "champion_before": before}
    if before is None or before == candidate:
        # No champion yet (the first model became it), or this night promoted before a crash.
        decision = Decision(True, ("no champion before this night" if before is None
                                   else "already promoted by this night before a restart",), {})
        promote(cfg, run_id, candidate, before, night)
    else:
        cand_metrics = evaluate_version(cfg, candidate)
        champ_metrics = evaluate_version(cfg, before)
        decision = decide(cand_metrics, champ_metrics, cfg.gate.metrics, cfg.gate.min_margin)
        log_comparison(run_id, cand_metrics, champ_metrics, decision)
        for line in decision.reasons:
            note(run_id, f"gate: {line}")
        summary.update({"candidate_metrics": {k: round(cand_metrics[k], 4) for k in cfg.gate.metrics if k in cand_metrics},
                        "champion_metrics": {k: round(champ_metrics[k], 4) for k in cfg.gate.metrics if k in champ_metrics}})
        if decision.promote:
            promote(cfg, run_id, candidate, before, night)
        else:
            client().set_registered_model_alias(name, CANDIDATE, candidate)
    summary["promoted"] = decision.promote
    summary["champion"] = alias_version(name, CHAMPION)
    if decision.promote:
        index_path = rebuild_index(cfg, run_id, candidate, snapshot) if cfg.index.enabled else ""
        summary["index"] = index_path
        summary["serve"] = (reconfigure_serve(cfg, run_id, str(RegistryRef(name, version=candidate)), index_path)
                            if cfg.serve.enabled else "disabled")
    verdict = f"promoted v{candidate}" if decision.promote else f"kept v{before} (v{candidate} not better)"
    note(run_id, f"decision: {verdict}", **{DECISION_TAG: verdict})
    summary["decision"] = verdict
    return summary
