"""`raybind finetune`'s config: where to start (init), what to learn (task, head), and the shared
training sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from models.reference import RegistryRef, parse_registry_ref
from models.spec import MODALITIES
from pipelines.core import tracking
from pipelines.core.config import require
from pipelines.training.config import EvalSection, OptimConfig, TrainConfig
from pipelines.training.data import DataConfig
from pipelines.training.finetune_tasks import (
    LABEL_JOIN,
)
from pipelines.training.tasks import LossConfig

PARENT_TAG, PARENT_VERSION_TAG, PARENT_URI_TAG = "raybind.parent_model", "raybind.parent_version", "raybind.parent_uri"


def _check_modalities(names, field_name: str) -> None:
    for m in names:
        require(m in MODALITIES, field_name, f"{m!r} is not a modality; choose from {', '.join(MODALITIES)}")


@dataclass(frozen=True)
class InitSection:
    from_model: str = ""  # models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, or a model / checkpoint folder
    pretrained: bool = True  # false: the same architecture, randomly initialised (the from-scratch baseline)
    lock: tuple[str, ...] = ()  # towers kept frozen, e.g. [text] for LiT-style retrieval tuning
    # The pretrained backbone learns at optim.lr x this, the new head at optim.lr: a head starting
    # from random weights sends large gradients into towers that already work. A random backbone
    # (pretrained=false) has nothing to keep and always learns at optim.lr.
    backbone_lr_scale: float = 1.0

    def __post_init__(self):
        _check_modalities(self.lock, "lock")
        require(0 < self.backbone_lr_scale <= 1, "init.backbone_lr_scale",
                f"must be in (0, 1], got {self.backbone_lr_scale}")


@dataclass(frozen=True)
class HeadSection:
    width: int = 128  # early / middle: fusion transformer width
    layers: int = 2  # early / middle: fusion transformer layers
    heads: int = 4
    hidden_dim: int = 256  # late: MLP hidden size
    num_bottlenecks: int = 4  # middle (MBT): shared tokens per layer
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("width", "layers", "heads", "hidden_dim", "num_bottlenecks"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        require(self.width % self.heads == 0, "heads", f"width {self.width} is not divisible by {self.heads}")
        require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class TaskSection:
    kind: Literal["classification", "linear_probe", "retrieval"] = "classification"
    modalities: tuple[str, ...] = ("image", "audio")  # what the task reads (the stream decodes only these)
    fusion: Literal["early", "late", "middle"] = "late"  # classification only
    label: str = "shape+rhythm"  # a .json field, or fields joined by "+" (classes = cartesian product)
    classes: tuple[str, ...] = ()  # () = from the manifest's attribute vocabularies
    head: HeadSection = field(default_factory=HeadSection)
    loss: LossConfig = field(default_factory=LossConfig)  # retrieval only

    def __post_init__(self):
        _check_modalities(self.modalities, "modalities")
        require(len(set(self.modalities)) == len(self.modalities) >= 1, "modalities", "must be distinct, >= 1")
        if self.kind == "linear_probe":
            require(len(self.modalities) == 1, "modalities", "a linear probe reads one modality (run one per modality)")
        if self.kind == "retrieval":
            require(len(self.modalities) == 2, "modalities", "retrieval fine-tunes one modality pair")
        else:
            require(all(self.label_fields), "label", f"{self.label!r}: expected field or field+field")

    @property
    def label_fields(self) -> tuple[str, ...]:
        return tuple(f.strip() for f in self.label.split(LABEL_JOIN))



@dataclass(frozen=True)
class FinetuneConfig:
    init: InitSection = field(default_factory=InitSection)
    task: TaskSection = field(default_factory=TaskSection)
    data: DataConfig = field(default_factory=DataConfig)  # data.reader.modalities is ignored: the task decides
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSection = field(default_factory=lambda: EvalSection(max_samples=1024))
    mlflow: tracking.TrackingConfig = field(
        default_factory=lambda: tracking.TrackingConfig(registered_model="raybind-finetune"))

    def __post_init__(self):
        require(bool(self.init.from_model), "init.from_model",
                "required: models:/NAME@ALIAS, models:/NAME/VERSION or a model / checkpoint folder "
                "(with init.pretrained=false only its architecture is used)")
        extra = sorted(set(self.init.lock) - set(self.task.modalities))
        require(not extra, "init.lock", f"{extra} are not among task.modalities {list(self.task.modalities)}")


@dataclass(frozen=True)
class ParentModel:
    """The model fine-tuning starts from: the reference as given, where it lies, what it is."""

    ref: str
    local_dir: str
    version: str  # registry version the reference resolved to ("" for a folder)
    config: dict  # its models.config.ModelConfig as a dict

    def tags(self) -> dict[str, str]:
        if self.version:  # an alias moves on; the version it named when this run started does not
            pinned = str(RegistryRef(parse_registry_ref(self.ref).name, version=self.version))
        else:
            pinned = self.ref if self.ref.startswith("runs:/") else self.local_dir
        return {PARENT_TAG: self.ref, PARENT_VERSION_TAG: self.version, PARENT_URI_TAG: pinned}
