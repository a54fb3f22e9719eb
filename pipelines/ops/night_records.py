"""What a night keeps: its lock, its data snapshot, the gate's decision and its MLflow run (the night's
record, which makes a finished night idempotent and a crashed one resumable)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines.core import storage, tracking, workspace
from pipelines.ops.nightly_config import (
    CHAMPION_BEFORE_TAG,
    NIGHT_TAG,
    Decision,
    NightLockedError,
    NightlyConfig,
)
from pipelines.registry.model_registry import CHAMPION


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
    sub-folder with a manifest whose name sorts last (date-stamped names such as YYYY-MM-DD)."""
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



def log_comparison(run_id: str, candidate: dict, champion: dict, decision: Decision) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"candidate/{k}", v, now, 0) for k, v in candidate.items() if v is not None and not math.isnan(v)]
    metrics += [Metric(f"champion/{k}", v, now, 0) for k, v in champion.items() if v is not None and not math.isnan(v)]
    metrics += [Metric(f"delta/{k}", v, now, 0) for k, v in decision.deltas.items()]
    metrics.append(Metric("promoted", float(decision.promote), now, 0))
    client().log_batch(run_id, metrics=[Metric(m.key.replace("@", "_at_").replace("->", "_to_"), m.value,
                                               m.timestamp, m.step) for m in metrics])
    client().log_dict(run_id, {"promote": decision.promote, "reasons": list(decision.reasons),
                               "deltas": decision.deltas, "candidate": candidate, "champion": champion},
                      "nightly/decision.json")

