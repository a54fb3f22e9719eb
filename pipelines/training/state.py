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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    """Record every file of a finished checkpoint folder; call it last."""
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != CHECKSUMS_FILE}
    (directory / CHECKSUMS_FILE).write_text(json.dumps({"files": files}, indent=1))


def checksum_sizes(raw: bytes) -> dict[str, int]:
    """{relative path: bytes} from a checksums.json; ValueError if it is not one."""
    files = json.loads(raw)["files"]
    return {name: int(entry["bytes"]) for name, entry in files.items()}


def verify_checkpoint(directory: Path) -> str | None:
    """None if the local checkpoint folder matches its checksums, else what is wrong (one line)."""
    listing = directory / CHECKSUMS_FILE
    if not listing.is_file():
        return f"{directory.name}: no {CHECKSUMS_FILE} (the checkpoint was not finished)"
    try:
        files = json.loads(listing.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"{directory.name}: unreadable {CHECKSUMS_FILE} ({exc})"
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return f"{directory.name}: {name} is missing"
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            return f"{directory.name}: {name} does not match its checksum (truncated or changed)"
    return None
