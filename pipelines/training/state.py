"""What a training checkpoint holds and how it is written and read back (no pickles).

  model/            the task's artefact (config.json + model.safetensors)
  train_state.pt    optimiser, scheduler, torch RNG: tensors and numbers only (weights_only=True)
  state.json        step, data position (global samples consumed), MLflow run id, numpy RNG
  checksums.json    size and sha256 of every file above, written last: a checkpoint without it, or
                    whose files do not match it, was cut short and is skipped for an older one
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.core import storage

STATE_FILE = "state.json"
CHECKSUMS_FILE = "checksums.json"
CHECKPOINT_PREFIX = "checkpoint_step_"


@dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    samples_seen: int = 0  # global samples consumed, in the stream's deterministic order
    mlflow_run_id: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def read_state(directory: str | Path) -> TrainState:
    data = json.loads((Path(directory) / STATE_FILE).read_text())
    return TrainState(**{k: data[k] for k in ("step", "samples_seen", "mlflow_run_id")})


def save_train_state(directory: Path, optimizer, scheduler, state: TrainState) -> None:
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, directory / "train_state.pt")
    np_state = np.random.get_state()
    payload = {**state.to_json(), "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    (directory / STATE_FILE).write_text(json.dumps(payload))


def load_train_state(directory: Path, optimizer, scheduler) -> TrainState:
    blob = torch.load(directory / "train_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    data = json.loads((directory / STATE_FILE).read_text())
    name, keys, *rest = data["numpy_rng"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    return read_state(directory)


def _sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    """Record every file of a finished checkpoint folder; call it last."""
    fs, _ = storage.filesystem(str(directory))
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(fs, str(p))}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != CHECKSUMS_FILE}
    (directory / CHECKSUMS_FILE).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(location: str | Path) -> str | None:
    """None if the checkpoint folder (local or s3://) matches its checksums, else what is wrong in
    one line. The driver (data position) and the worker (weights) both ask this, so they always
    agree on which checkpoint a run resumes from."""
    fs, root = storage.filesystem(str(location))
    name = root.rstrip("/").rsplit("/", 1)[-1]
    try:
        files = json.loads(fs.cat(f"{root}/{CHECKSUMS_FILE}"))["files"]
    except FileNotFoundError:
        return f"{name}: no {CHECKSUMS_FILE} (the checkpoint was not finished)"
    except (ValueError, KeyError) as exc:
        return f"{name}: unreadable {CHECKSUMS_FILE} ({exc})"
    for rel, entry in files.items():
        path = f"{root}/{rel}"
        if not fs.exists(path):
            return f"{name}: {rel} is missing"
        if fs.size(path) != entry["bytes"] or _sha256(fs, path) != entry["sha256"]:
            return f"{name}: {rel} does not match its checksum (truncated or changed)"
    return None
