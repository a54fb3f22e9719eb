"""What a training checkpoint holds and how it is written and read back (no pickles).

  model/            the task's artefact (config.json + model.safetensors)
  train_state.pt    optimiser, scheduler, torch RNG: tensors and numbers only (weights_only=True)
  state.json        step, data position (global samples consumed), MLflow run id, numpy RNG
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "state.json"


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
