"""Downstream heads on a `BindingModel`: a classifier over a chosen subset of modalities, and the
metrics that judge it. Library code: torch + numpy, no Ray, no MLflow.

Fusion strategies (where the modalities meet), each one module of `models/fusion.py`:
- `early`: every modality's token sequence (`encode_tokens`) goes through ONE transformer together
  (`AttentionFusion`: a CLS token attends over all tokens).
- `late`: pooled shared-space embeddings, concatenated, then an MLP (`LateFusion`).
- `middle`: MBT bottleneck tokens (`BottleneckFusion`): per-modality streams that exchange
  information only through a few shared tokens.
- `probe`: one modality's embedding -> one linear layer (the representation-quality measure; the
  towers are frozen by the task that uses it).

A classifier artefact is a model folder (`config.json` + `model.safetensors`: the backbone, so every
loader of a BindingModel still works) plus `head.json` + `head.safetensors` (the head).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.binding import BindingModel
from models.checkpoint import ConfigMismatchError, load_model, load_state_dict, save_model
from models.fusion import AttentionFusion, BottleneckFusion, LateFusion
from models.spec import MODALITIES

FUSIONS = ("early", "late", "middle", "probe")
HEAD_CONFIG, HEAD_WEIGHTS = "head.json", "head.safetensors"


@dataclass(frozen=True)
class HeadConfig:
    """What the head sees (modalities), how it fuses them, and the class names it predicts."""

    fusion: str
    modalities: tuple[str, ...]
    classes: tuple[str, ...]
    label: str = ""  # what the classes name, e.g. "shape+rhythm" (kept for readers of the artefact)
    width: int = 128  # early / middle: transformer width
    layers: int = 2  # early / middle: transformer layers
    heads: int = 4
    hidden_dim: int = 256  # late: MLP hidden size
    num_bottlenecks: int = 4  # middle: shared tokens per layer
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion: {self.fusion!r} is not one of {', '.join(FUSIONS)}")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if not self.modalities or unknown or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities: expected distinct names from {MODALITIES}, got {list(self.modalities)}")
        if self.fusion == "probe" and len(self.modalities) != 1:
            raise ValueError(f"modalities: a linear probe reads one modality, got {list(self.modalities)}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes: need >= 2 distinct class names, got {len(self.classes)}")
        if self.width % self.heads:
            raise ValueError(f"heads: width {self.width} is not divisible by {self.heads} heads")

    @property
    def uses_tokens(self) -> bool:
        return self.fusion in ("early", "middle")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> HeadConfig:
        return cls(**dict(data))


def build_fusion(head: HeadConfig, backbone: BindingModel) -> nn.Module:
    """The head module; its input sizes come from the backbone (tower widths or embed_dim)."""
    n = len(head.classes)
    if head.fusion == "probe":
        return nn.Linear(backbone.embed_dim, n)
    if head.fusion == "late":
        return LateFusion({m: backbone.embed_dim for m in head.modalities}, n, head.hidden_dim, head.dropout)
    widths = {m: backbone.encoder(m).width for m in head.modalities}
    if head.fusion == "early":
        return AttentionFusion(widths, n, head.width, head.heads, head.layers, head.dropout)
    return BottleneckFusion(widths, n, head.width, head.heads, head.layers, head.num_bottlenecks, head.dropout)


class Classifier(nn.Module):
    """Backbone towers -> features per modality -> fusion head -> class logits (B, num_classes)."""

    def __init__(self, backbone: BindingModel, head: HeadConfig):
        super().__init__()
        missing = [m for m in head.modalities if m not in backbone.modalities]
        if missing:
            raise ConfigMismatchError(f"the head needs {missing}, the model encodes only {list(backbone.modalities)}")
        self.backbone = backbone
        self.head_config = head
        self.fusion = build_fusion(head, backbone)

    def features(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Token sequences (early / middle) or shared-space embeddings (late / probe) per modality."""
        mods = [m for m in self.head_config.modalities if m in inputs]
        if self.head_config.uses_tokens:
            return {m: self.backbone.encode_tokens(m, inputs[m]) for m in mods}
        # Unit-norm embeddings have per-dimension scale ~1/sqrt(D); rescaling keeps the probe linear
        # while giving it inputs of order 1, so one learning rate suits every head.
        scale = math.sqrt(self.backbone.embed_dim)
        return {m: self.backbone.encode(m, inputs[m]) * scale for m in mods}

    def forward(self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
        feats = self.features(inputs)
        if self.head_config.fusion == "probe":
            return self.fusion(feats[self.head_config.modalities[0]])
        return self.fusion(feats, {m: v for m, v in (masks or {}).items() if m in feats})


# ----------------------------------------------------------------------------- freezing
def tower_parameter_ids(model: BindingModel, modalities: Iterable[str]) -> set[int]:
    """ids of the parameters the towers (encoder + projection head) of `modalities` own; a video
    tower that shares the image ViT owns it too."""
    ids: set[int] = set()
    for m in modalities:
        ids.update(id(p) for p in model.encoders[m].parameters())
        ids.update(id(p) for p in model.heads[m].parameters())
    return ids


def freeze_unused(model: BindingModel, used: Iterable[str], keep_temperature: bool = False) -> None:
    """Freeze every parameter no used tower owns. They would get no gradient anyway; frozen, they also
    stay out of the optimiser and DDP's gradient buckets (the text tower is most of `tiny`)."""
    keep = tower_parameter_ids(model, used)
    for name, p in model.named_parameters():
        if id(p) not in keep and not (keep_temperature and name in ("logit_scale", "logit_bias")):
            p.requires_grad_(False)


# ----------------------------------------------------------------------------- artefact
def save_classifier(model: Classifier, directory: str | Path) -> Path:
    directory = save_model(model.backbone, directory)
    (directory / HEAD_CONFIG).write_text(json.dumps(model.head_config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.fusion.state_dict().items()}
    save_file(state, str(directory / HEAD_WEIGHTS), metadata={"format": "pt"})
    return directory


def load_classifier_weights(model: Classifier, directory: str | Path) -> None:
    """Load a saved classifier's backbone and head into `model` (strict; mismatches are named)."""
    directory = Path(directory)
    load_state_dict(model.backbone, load_file(str(directory / "model.safetensors")))
    load_state_dict(model.fusion, load_file(str(directory / HEAD_WEIGHTS)))


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> Classifier:
    directory = Path(directory)
    if not (directory / HEAD_CONFIG).is_file():
        raise ConfigMismatchError(f"{directory}: no {HEAD_CONFIG}; this is a binding model, not a classifier")
    head = HeadConfig.from_dict(json.loads((directory / HEAD_CONFIG).read_text()))
    model = Classifier(load_model(directory), head)
    load_state_dict(model.fusion, load_file(str(directory / HEAD_WEIGHTS)))
    return model.to(device)


# ----------------------------------------------------------------------------- metrics
@dataclass
class ClassificationMetrics:
    accuracy: float
    macro_f1: float
    confusion: np.ndarray  # [true class, predicted class] counts
    support: int  # samples scored

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "support": float(self.support)}


def classification_metrics(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> ClassificationMetrics:
    """Accuracy, macro-F1 (over classes seen in truth or predictions, as sklearn does) and the
    confusion matrix. Entries with truth < 0 (unknown label) are ignored."""
    keep = truth >= 0
    pred, truth = np.asarray(pred)[keep], np.asarray(truth)[keep]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (truth, pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    precision_den, recall_den = confusion.sum(0), confusion.sum(1)
    f1 = np.divide(2 * tp, precision_den + recall_den, out=np.zeros_like(tp), where=(precision_den + recall_den) > 0)
    seen = (precision_den + recall_den) > 0
    accuracy = float(tp.sum() / max(len(truth), 1))
    macro_f1 = float(f1[seen].mean()) if seen.any() else 0.0
    return ClassificationMetrics(accuracy, macro_f1, confusion, int(len(truth)))
