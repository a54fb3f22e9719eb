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

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.core import storage, tracking, workspace
from pipelines.core.config import require
from pipelines.core.errors import OperationalError
from pipelines.core.ray_runtime import ensure_ray
from pipelines.eval.evaluate import evaluate_model, flat_metrics
from pipelines.eval.index import build_index
from pipelines.ops.cluster import client_env, is_up, read_state
from pipelines.ops.jobs import target
from pipelines.registry.model_registry import CANDIDATE, CHAMPION, PREVIOUS, local_model_dir
from pipelines.training.pretrain import PretrainConfig, run_pretrain

NIGHT_TAG = "raybind.night"
DECISION_TAG = "raybind.nightly.decision"
CHAMPION_BEFORE_TAG = "raybind.nightly.champion_before"


class NightLockedError(OperationalError):
    """Another night holds the lock (the message names its pid and start time)."""


@dataclass(frozen=True)
class NightData:
    root: str = ""  # a data set (has manifest.json) or a folder of date-stamped data sets; "" = <home>/data/nightly
    heldout: str = ""  # the FIXED held-out set every night is judged on; "" = <home>/data/shapesworld
    heldout_split: str = "test"
    max_samples: int = 512
    batch_size: int = 128

    def __post_init__(self):
        require(self.max_samples >= 2, "max_samples", "must be >= 2")


@dataclass(frozen=True)
class GateConfig:
    metrics: tuple[str, ...] = ("mean_R@1",)  # headline names or eval/... metric names; higher is better
    min_margin: float = 0.01  # promote only if EVERY metric >= champion + min_margin

    def __post_init__(self):
        require(len(self.metrics) >= 1, "metrics", "name at least one metric")


@dataclass(frozen=True)
class NightIndex:
    enabled: bool = True
    data: str = ""  # "" = the night's data snapshot
    root: str = ""  # each champion gets <root>/v<version>; "" = <home>/index/nightly
    batch_size: int = 64
    concurrency: int = 1
    num_cpus_per_actor: float = 1.0
    read_cpus_per_task: float = 0.5


@dataclass(frozen=True)
class NightServe:
    enabled: bool = True
    app: str = "raybind"  # the Serve application to point at the new champion and index
    dashboard_url: str = ""  # "" = $RAY_API_SERVER_ADDRESS or the local cluster's
    timeout_s: float = 300.0


@dataclass(frozen=True)
class NightlyConfig:
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # data.train / init / run name are set per night
    data: NightData = field(default_factory=NightData)
    gate: GateConfig = field(default_factory=GateConfig)
    index: NightIndex = field(default_factory=NightIndex)
    serve: NightServe = field(default_factory=NightServe)
    mlflow: tracking.TrackingConfig = field(default_factory=tracking.TrackingConfig)
    lock_file: str = ""  # "" = <home>/locks/nightly.lock
    lock_only: bool = False  # take the lock, report, release (checks a deployment without training)

    def __post_init__(self):
        require(bool(self.mlflow.registered_model), "mlflow.registered_model", "the nightly job needs a model name")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: tuple[str, ...]
    deltas: dict[str, float]


# ----------------------------------------------------------------------------- lock and snapshot
@contextlib.contextmanager
def night_lock(path: str = "") -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock; NightLockedError if another process holds it."""
    lock = Path(path) if path else workspace.subdir("locks") / "nightly.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read_text().strip() or "unknown process"
            raise NightLockedError(f"another nightly run holds {lock} ({holder}); not starting a second one") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield lock
    finally:
        os.close(fd)  # closing releases the lock


def newest_snapshot(root: str) -> tuple[str, str]:
    """(url, night id) of the newest data set: `root` itself if it has a manifest, else its
    sub-folder with a manifest whose name sorts last (date-stamped names: 2026-11-27, ...)."""
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        raise FileNotFoundError(f"data.root: {root} does not exist")
    if fs.exists(f"{path}/manifest.json"):
        chosen = root.rstrip("/")
    else:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)
                       if fs.isdir(p) and fs.exists(f"{p.rstrip('/')}/manifest.json"))
        if not names:
            raise FileNotFoundError(f"data.root: {root} has no manifest.json and no sub-folder with one")
        chosen = storage.join(root.rstrip("/"), names[-1])
    _, chosen_path = storage.filesystem(chosen)
    with fs.open(f"{chosen_path}/manifest.json", "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:10]
    return chosen, f"{chosen.rstrip('/').rsplit('/', 1)[-1]}-{digest}"


# ----------------------------------------------------------------------------- the gate
def decide(candidate: dict[str, float], champion: dict[str, float], metrics: tuple[str, ...],
           min_margin: float) -> Decision:
    """Promote only if every gate metric of the candidate is >= the champion's + min_margin."""
    reasons, deltas, ok = [], {}, True
    for name in metrics:
        cand, champ = candidate.get(name), champion.get(name)
        if cand is None or champ is None or math.isnan(cand) or math.isnan(champ):
            side = "candidate" if cand is None or math.isnan(cand) else "champion"
            reasons.append(f"{name}: missing or NaN for the {side} (have: {', '.join(sorted(candidate))[:200]})")
            ok = False
            continue
        deltas[name] = cand - champ
        passed = deltas[name] >= min_margin - 1e-12
        ok &= passed
        reasons.append(f"{name}: candidate {cand:.4f} vs champion {champ:.4f} ({deltas[name]:+.4f}, "
                       f"need >= {min_margin:+.4f}): {'pass' if passed else 'FAIL'}")
    return Decision(promote=ok, reasons=tuple(reasons), deltas=deltas)


# ----------------------------------------------------------------------------- MLflow helpers
def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def alias_version(name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def find_night_run(cfg: NightlyConfig, night: str):
    """The newest nightly run of this night (any status), or None."""
    import mlflow

    exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is None:
        return None
    runs = client().search_runs([exp.experiment_id], f"tags.`{NIGHT_TAG}` = '{night}' and tags.`raybind.job` = 'nightly'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def open_night_run(cfg: NightlyConfig, night: str, snapshot: str) -> tuple[str, str | None]:
    """(run id, champion version before this night). Reopens a crashed night's run."""
    import mlflow

    name = cfg.mlflow.registered_model
    old = find_night_run(cfg, night)
    if old is not None:
        client().update_run(old.info.run_id, status="RUNNING")
        before = old.data.tags.get(CHAMPION_BEFORE_TAG, "") or None
        print(f"nightly: resuming night {night} (run {old.info.run_id}; champion before it: v{before})", flush=True)
        return old.info.run_id, before
    before = alias_version(name, CHAMPION)
    exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    run = client().create_run(exp.experiment_id, run_name=f"nightly-{night}", tags={
        "raybind.job": "nightly", NIGHT_TAG: night, "raybind.data": snapshot,
        CHAMPION_BEFORE_TAG: before or "", "raybind.git_commit": tracking.git_commit()})
    client().log_dict(run.info.run_id, tracking.flatten(dataclasses.asdict(cfg)), "config/nightly.json")
    return run.info.run_id, before


def note(run_id: str, message: str, **tags: str) -> None:
    """Print a decision line and keep it on the run (tags + an append-only log artifact)."""
    print(f"nightly: {message}", flush=True)
    for key, value in tags.items():
        client().set_tag(run_id, key, value)
    path = workspace.subdir("logs") / f"nightly-{run_id}.log"
    with open(path, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
    client().log_artifact(run_id, str(path), "nightly")


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
    champion_dir = local_model_dir(f"models:/{name}/{champion}") if champion else None
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
    folder = local_model_dir(f"models:/{cfg.mlflow.registered_model}/{version}")
    d = cfg.data
    report = evaluate_model(folder, heldout_url(cfg), split=d.heldout_split, max_samples=d.max_samples,
                            batch_size=d.batch_size)
    return {**report["headline"], **flat_metrics(report["retrieval"], report["zero_shot"]),
            "samples": float(report["samples"])}


def heldout_url(cfg: NightlyConfig) -> str:
    return cfg.data.heldout or str(workspace.home() / "data" / "shapesworld")


def log_comparison(run_id: str, candidate: dict, champion: dict, decision: Decision) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"candidate/{k}", v, now, 0) for k, v in candidate.items() if not math.isnan(v)]
    metrics += [Metric(f"champion/{k}", v, now, 0) for k, v in champion.items() if not math.isnan(v)]
    metrics += [Metric(f"delta/{k}", v, now, 0) for k, v in decision.deltas.items()]
    metrics.append(Metric("promoted", float(decision.promote), now, 0))
    client().log_batch(run_id, metrics=[Metric(m.key.replace("@", "_at_").replace("->", "_to_"), m.value,
                                               m.timestamp, m.step) for m in metrics])
    client().log_dict(run_id, {"promote": decision.promote, "reasons": list(decision.reasons),
                               "deltas": decision.deltas, "candidate": candidate, "champion": champion},
                      "nightly/decision.json")


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
    summary = build_index(f"models:/{cfg.mlflow.registered_model}/{version}", ix.data or snapshot, out,
                          batch_size=ix.batch_size, concurrency=ix.concurrency,
                          num_cpus_per_actor=ix.num_cpus_per_actor, read_cpus_per_task=ix.read_cpus_per_task,
                          overwrite=True, tracking_uri=tracking.resolve_uri(cfg.mlflow))
    note(run_id, f"index rebuilt at {out}: {summary['rows']} rows in {summary['seconds']} s",
         **{"raybind.nightly.index": out})
    return out


def retarget_serve_config(app_config: dict, model_uri: str, index_path: str) -> dict:
    """A copy of a deployed raybind application's config that serves `model_uri` and `index_path`.
    Only the deployments' user_config changes, so Serve reconfigures the running replicas in place
    (no restart); the old model keeps answering until the new one is loaded."""
    new = json.loads(json.dumps(app_config))
    deployments = {d.get("name"): d for d in new.setdefault("deployments", [])}
    for name, key, value in (("Embedder", "model_uri", model_uri), ("Searcher", "index_path", index_path)):
        if not value:
            continue
        dep = deployments.get(name)
        if dep is None:
            dep = {"name": name}
            new["deployments"].append(dep)
        dep["user_config"] = {**(dep.get("user_config") or {}), key: value}
    return new


def serve_request(url: str, headers: dict[str, str], method: str = "GET", body: dict | None = None) -> dict:
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={**headers, **({"Content-Type": "application/json"} if data else {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    return json.loads(text) if text.strip() else {}


def reconfigure_serve(cfg: NightlyConfig, run_id: str, model_uri: str, index_path: str) -> str:
    """Point the running Serve app (if any) at the new champion through the dashboard's REST API,
    exactly what `serve deploy` does; wait until it is RUNNING again. Returns what happened."""

    try:
        url, headers, _ = target(cfg.serve.dashboard_url)
        details = serve_request(f"{url}/api/serve/applications/", headers)
    except (OSError, ValueError, RuntimeError) as exc:
        return skip_serve(run_id, f"no Ray dashboard to ask ({exc})")
    apps = details.get("applications") or {}
    app = apps.get(cfg.serve.app)
    if app is None or not app.get("deployed_app_config"):
        return skip_serve(run_id, f"no declaratively deployed Serve app {cfg.serve.app!r} running "
                                  f"(apps: {sorted(apps) or 'none'})")
    configs = [retarget_serve_config(a["deployed_app_config"], model_uri, index_path) if name == cfg.serve.app
               else a["deployed_app_config"] for name, a in apps.items() if a.get("deployed_app_config")]
    body = {"applications": configs, "proxy_location": details.get("proxy_location") or "HeadOnly",
            "http_options": details.get("http_options") or {}}
    serve_request(f"{url}/api/serve/applications/", headers, "PUT", body)
    deadline = time.monotonic() + cfg.serve.timeout_s
    while time.monotonic() < deadline:
        status = (serve_request(f"{url}/api/serve/applications/", headers).get("applications", {})
                  .get(cfg.serve.app, {}).get("status", ""))
        if status == "RUNNING":
            note(run_id, f"Serve app {cfg.serve.app!r} now serves {model_uri} (index {index_path or 'unchanged'})",
                 **{"raybind.nightly.serve": "reconfigured"})
            return "reconfigured"
        if status == "DEPLOY_FAILED":
            break
        time.sleep(2)
    note(run_id, f"Serve app {cfg.serve.app!r} did not come back RUNNING (last status {status!r})",
         **{"raybind.nightly.serve": f"failed: {status}"})
    return f"failed: {status}"


def skip_serve(run_id: str, why: str) -> str:
    note(run_id, f"serve: skipped, {why}", **{"raybind.nightly.serve": "skipped"})
    return "skipped"


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
        summary["serve"] = (reconfigure_serve(cfg, run_id, f"models:/{name}/{candidate}", index_path)
                            if cfg.serve.enabled else "disabled")
    verdict = f"promoted v{candidate}" if decision.promote else f"kept v{before} (v{candidate} not better)"
    note(run_id, f"decision: {verdict}", **{DECISION_TAG: verdict})
    summary["decision"] = verdict
    return summary
