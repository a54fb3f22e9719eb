"""Save / load a `BindingModel` as a folder: `config.json` + `model.safetensors` (no pickles anywhere).

Tied weights (video sharing the image tower) appear under several state-dict names but are one
tensor; safetensors refuses to store aliases, so each shared tensor is stored once under its first
name and re-expanded on load from the model's own aliasing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.binding import BindingModel
from models.config import ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "raybind-model/1"


class ConfigMismatchError(ValueError):
    """A checkpoint does not match the expected config or model; the message names every mismatch."""


def save_model(model: BindingModel, directory: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` into `directory` (created if needed); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    aliases = alias_groups(state)
    duplicates = {name for group in aliases for name in group[1:]}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in duplicates}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "raybind": FORMAT})
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    return directory


def load_model(directory: str | Path, expected: ModelConfig | None = None,
               device: str | torch.device = "cpu") -> BindingModel:
    """Build the model from `config.json` and load `model.safetensors` into it.

    With `expected`, the checkpoint's config must match it (the `name` aside); otherwise, and in any
    case if the weights do not fit the config, a ConfigMismatchError names each mismatched field / tensor.
    """
    directory = Path(directory)
    config = ModelConfig.from_file(directory / CONFIG_FILE)
    if expected is not None:
        problems = config_diff(config, expected)
        if problems:
            raise ConfigMismatchError(f"{directory}: checkpoint config does not match: " + "; ".join(problems))
    model = BindingModel(config, load_pretrained=False)  # the saved weights replace any pretrained ones
    load_state_dict(model, load_file(str(directory / WEIGHTS_FILE)))
    return model.to(device)


def load_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Strict `load_state_dict` that accepts de-duplicated tied weights and names every problem
    (missing keys, unexpected keys, shape mismatches) in one ConfigMismatchError."""
    expected = model.state_dict()
    full = dict(state)
    for group in alias_groups(expected):  # re-expand tied weights stored once
        stored = next((full[name] for name in group if name in full), None)
        if stored is not None:
            for name in group:
                full.setdefault(name, stored)
    problems = state_dict_diff(full, expected)
    if problems:
        raise ConfigMismatchError("weights do not fit the model: " + "; ".join(problems))
    model.load_state_dict(full, strict=True)


def state_dict_diff(checkpoint: Mapping[str, Tensor], model: Mapping[str, Tensor]) -> list[str]:
    """Human-readable differences: missing / unexpected keys and shape mismatches."""
    problems = [f"{k}: missing from checkpoint" for k in model if k not in checkpoint]
    problems += [f"{k}: unexpected in checkpoint" for k in checkpoint if k not in model]
    problems += [f"{k}: checkpoint shape {tuple(v.shape)}, model {tuple(model[k].shape)}"
                 for k, v in checkpoint.items() if k in model and v.shape != model[k].shape]
    return problems


def config_diff(checkpoint: ModelConfig, expected: ModelConfig) -> list[str]:
    """`field: checkpoint X, expected Y` for every differing (dotted) field; `name` is not compared."""
    ours, theirs = _flatten(checkpoint.to_dict()), _flatten(expected.to_dict())
    keys = sorted((set(ours) | set(theirs)) - {"name"})
    return [f"{k}: checkpoint {ours.get(k)!r}, expected {theirs.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)]


def alias_groups(state: Mapping[str, Tensor]) -> list[list[str]]:
    """Names that refer to the same tensor memory (tied / shared weights), first name first."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        if tensor.numel() == 0:
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tuple(tensor.stride()))
        groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out
