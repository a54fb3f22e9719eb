"""Fine-tuning tasks for the one Ray Train loop (`loop.py`): each builds its module from a pretrained
(or freshly initialised) BindingModel, turns a batch into a loss, and exports its artefact.

- `ClassificationTask`: a label from a subset of modalities, fused early / late / middle (MBT).
- `LinearProbeTask`: one modality's frozen embedding -> a linear layer; only the layer trains.
- `RetrievalTask`: the contrastive loss on one modality pair (optionally one tower locked, LiT).

Labels are `.json` fields read by the stream as strings; a combination label ("shape+rhythm") is the
fields' values joined by "+". Strings become class ids here, inside `compute`, on the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.binding import BindingModel, split_batch
from models.checkpoint import load_model
from models.config import ModelConfig
from models.heads import Classifier, HeadConfig, freeze_unused, load_classifier_weights, save_classifier
from pipelines.core.config import require
from pipelines.training.tasks import ContrastiveTask, StepOutput, unwrap

IGNORE = -100  # cross_entropy's ignore_index: a sample whose label is unknown or whose inputs are all absent
LABEL_JOIN = "+"


@dataclass(frozen=True)
class LabelSpec:
    """Which `.json` fields make the label, and the class names (values joined by "+") in id order."""

    fields: tuple[str, ...]
    classes: tuple[str, ...]

    @property
    def name(self) -> str:
        return LABEL_JOIN.join(self.fields)

    def ids(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B,) int64 class ids of a batch; IGNORE for values outside the vocabulary."""
        index = {c: i for i, c in enumerate(self.classes)}
        columns = [batch[f] for f in self.fields]
        names = [LABEL_JOIN.join(str(v) for v in values) for values in zip(*columns, strict=True)]
        return torch.tensor([index.get(n, IGNORE) for n in names], dtype=torch.int64)


def build_backbone(model_config: dict, init_from: str):
    """The pretrained model from `init_from` (checked against `model_config`), or a fresh one."""

    config = ModelConfig.from_dict(model_config)
    return load_model(init_from, expected=config) if init_from else BindingModel(config)


@dataclass(frozen=True)
class ClassificationTask:
    """Multimodal classification; the fusion strategy is `head.fusion` (early | late | middle)."""

    model_config: dict  # models.config.ModelConfig as a dict
    head: dict  # models.heads.HeadConfig as a dict (plain data ships to workers without surprises)
    label: LabelSpec
    init_from: str = ""  # a local model folder; "" = train the same architecture from scratch
    lock: tuple[str, ...] = ()  # towers kept frozen
    name: str = "classification"

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.head["modalities"])

    def head_config(self):
        return HeadConfig.from_dict(self.head)

    def build(self) -> torch.nn.Module:
        backbone = build_backbone(self.model_config, self.init_from)
        freeze_unused(backbone, self.modalities)
        if self.lock:
            backbone.lock(*self.lock)
        return Classifier(backbone, self.head_config())

    def targets(self, batch: dict[str, Any], masks: dict[str, torch.Tensor], device) -> torch.Tensor:
        ids = self.label.ids(batch).to(device)
        # A sample none of whose task modalities is present carries no evidence: leave it out.
        present = torch.stack([masks[m] for m in self.modalities if m in masks]).any(0)
        return torch.where(present, ids, IGNORE)

    def compute(self, module, batch, rank, world_size) -> StepOutput:
        inputs, masks = split_batch(batch, self.modalities)
        logits = module(inputs, masks).float()
        target = self.targets(batch, masks, logits.device)
        valid = target != IGNORE
        # All-ignored batch: cross_entropy would be NaN; a zero loss keeps DDP's ranks in step.
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE) if valid.any() else logits.sum() * 0.0
        correct = ((logits.argmax(1) == target) & valid).sum()
        accuracy = float(correct) / max(int(valid.sum()), 1)
        return StepOutput(loss, {"loss": float(loss.detach()), "accuracy": accuracy})

    def export(self, module, directory: Path) -> None:
        save_classifier(unwrap(module), directory)

    def load_weights(self, module, directory: Path) -> None:
        load_classifier_weights(unwrap(module), directory)


@dataclass(frozen=True)
class LinearProbeTask(ClassificationTask):
    """A linear layer on one modality's frozen embedding: every backbone parameter stays fixed."""

    name: str = "linear_probe"

    def __post_init__(self):
        require(self.head["fusion"] == "probe" and len(self.modalities) == 1, "task",
                "a linear probe reads exactly one modality through head fusion 'probe'")

    def build(self) -> torch.nn.Module:
        model = super().build()
        model.backbone.requires_grad_(False)
        model.backbone.lock(*self.modalities)  # also keeps the tower in eval mode
        return model


@dataclass(frozen=True)
class RetrievalTask(ContrastiveTask):
    """Contrastive fine-tuning of one modality pair; `lock` may freeze one of its towers (LiT)."""

    name: str = "retrieval"

    def __post_init__(self):
        require(len(self.modalities) == 2 and len(set(self.modalities)) == 2, "task.modalities",
                f"retrieval fine-tunes one modality pair, got {list(self.modalities)}")
        require(set(self.lock) < set(self.modalities), "init.lock",
                "may lock at most one tower of the pair (locking both leaves nothing to train)")

    def build(self) -> torch.nn.Module:
        model = super().build()
        freeze_unused(model, [m for m in self.modalities if m not in self.lock], keep_temperature=True)
        return model
