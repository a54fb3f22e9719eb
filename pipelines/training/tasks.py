"""Tasks: what a training job optimises. A task builds its module, turns a batch into a loss and
metrics, and exports its artefact. The Ray Train loop (`loop.py`) knows nothing else about it.

Tasks are plain frozen dataclasses so Ray can ship them to workers; they build torch modules only
inside the worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from models.binding import BindingModel, split_batch
from models.checkpoint import load_model, load_state_dict, save_model
from models.config import ModelConfig
from models.losses import ContrastiveLoss
from models.spec import MODALITIES
from pipelines.core.config import require


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


class Task(Protocol):
    name: str
    modalities: tuple[str, ...]

    def build(self) -> torch.nn.Module: ...

    def compute(self, module: torch.nn.Module, batch: dict[str, Any], rank: int, world_size: int) -> StepOutput: ...

    def export(self, module: torch.nn.Module, directory: Path) -> None: ...

    def load_weights(self, module: torch.nn.Module, directory: Path) -> None: ...


@dataclass(frozen=True)
class LossConfig:
    kind: Literal["infonce", "siglip"] = "infonce"
    # Which pairs are contrasted: "text" binds every modality to the captions (they name every
    # attribute); "all" also pairs e.g. video with image, which teaches video to drop motion.
    anchor: Literal["all", "image", "text"] = "text"
    pair_weights: dict[str, float] = field(default_factory=dict)  # e.g. {"audio-video": 0.5}

    def __post_init__(self):
        for pair, w in self.pair_weights.items():
            parts = pair.split("-")
            require(len(parts) == 2 and all(p in MODALITIES for p in parts),
                    f"pair_weights.{pair}", "pair names look like image-text, audio-video")
            require(w >= 0, f"pair_weights.{pair}", "must be >= 0")


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return module.module if hasattr(module, "module") and isinstance(
        module, torch.nn.parallel.DistributedDataParallel) else module


@dataclass(frozen=True)
class ContrastiveTask:
    """Bind modalities into one space with a multi-pair contrastive loss (CLIP / ImageBind style)."""

    model_config: dict  # models.config.ModelConfig as a dict (picklable, version-proof)
    loss: LossConfig
    modalities: tuple[str, ...]
    lock: tuple[str, ...] = ()  # towers kept frozen (LiT)
    init_from: str = ""  # a local model folder (config.json + model.safetensors) to start from
    name: str = "contrastive"

    def build(self) -> torch.nn.Module:
        config = ModelConfig.from_dict(self.model_config)
        model = load_model(self.init_from, expected=config) if self.init_from else BindingModel(config)
        for modality in self.lock:
            model.lock(modality)
        return model

    def loss_fn(self):
        return ContrastiveLoss(kind=self.loss.kind, anchor=self.loss.anchor,
                               pair_weights=dict(self.loss.pair_weights) or None)

    def compute(self, module, batch, rank, world_size) -> StepOutput:
        inputs, masks = split_batch(batch, self.modalities)
        output = module(inputs, masks)
        result = self.loss_fn()(output, masks, rank=rank, world_size=world_size)
        metrics = {"loss": float(result.total.detach()), "logit_scale": float(output.logit_scale.detach())}
        metrics.update({f"loss/{pair}": float(v.detach()) for pair, v in result.per_pair.items()})
        return StepOutput(result.total, metrics)

    def export(self, module, directory: Path) -> None:
        save_model(unwrap(module), directory)

    def load_weights(self, module, directory: Path) -> None:
        from safetensors.torch import load_file

        load_state_dict(unwrap(module), load_file(str(Path(directory) / "model.safetensors")))
