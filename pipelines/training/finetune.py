"""`raybind finetune`: adapt a pretrained binding model to a downstream task on Ray Train, with the
same loop, checkpoints, resume, fault tolerance and MLflow tracking as pretraining (`pretrain.py`).

    raybind finetune --config configs/finetune/shape_rhythm_late.yaml \
        --set init.from_model=models:/raybind-shapesworld@champion

Everything that can be wrong is checked before a worker starts: the model reference
(`ModelNotFoundError`), the checkpoint against the task (`ConfigMismatchError`: a modality the model
lacks, weights that do not fit their config), the label's class vocabulary and the data (`ConfigError`,
`FileNotFoundError`). After training, the last checkpoint is evaluated on the held-out split and
registered under the job's own model name, tagged with the pretrained version it came from.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from models.checkpoint import ConfigMismatchError, load_model
from models.heads import HeadConfig, classification_metrics, load_classifier
from pipelines.core import storage, tracking, workspace
from pipelines.core.config import ConfigError, require, to_dict
from pipelines.core.ray_runtime import ensure_ray
from pipelines.data.read import ReaderConfig, ReadStats, read_shards
from pipelines.data.write import shapesworld
from pipelines.eval.evaluate import all_retrieval, embed_all, flat_metrics
from pipelines.registry.model_registry import local_model_dir, register_model
from pipelines.training.config import OptimConfig, TrainConfig
from pipelines.training.data import DataConfig, DataPlan, TrainStream, resolve_data
from pipelines.training.finetune_tasks import (
    LABEL_JOIN,
    ClassificationTask,
    LabelSpec,
    LinearProbeTask,
    RetrievalTask,
)
from pipelines.training.loop import LoopSpec
from pipelines.training.pretrain import MODALITIES, build_trainer, fetch_checkpoint_model, tempfile_dir
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
class EvalSection:
    enabled: bool = True
    split: str = "test"
    max_samples: int = 1024
    batch_size: int = 128


@dataclass(frozen=True)
class FinetuneConfig:
    init: InitSection = field(default_factory=InitSection)
    task: TaskSection = field(default_factory=TaskSection)
    data: DataConfig = field(default_factory=DataConfig)  # data.modalities is ignored: the task decides
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    mlflow: tracking.TrackingConfig = field(
        default_factory=lambda: tracking.TrackingConfig(registered_model="raybind-finetune"))

    def __post_init__(self):
        require(bool(self.init.from_model), "init.from_model",
                "required: models:/NAME@ALIAS, models:/NAME/VERSION or a model / checkpoint folder "
                "(with init.pretrained=false only its architecture is used)")
        extra = sorted(set(self.init.lock) - set(self.task.modalities))
        require(not extra, "init.lock", f"{extra} are not among task.modalities {list(self.task.modalities)}")


# ----------------------------------------------------------------------------- the pretrained model
@dataclass(frozen=True)
class ParentModel:
    """The model fine-tuning starts from: the reference as given, where it lies, what it is."""

    ref: str
    local_dir: str
    version: str  # registry version the reference resolved to ("" for a folder)
    config: dict  # its models.config.ModelConfig as a dict

    def tags(self) -> dict[str, str]:
        if self.version:  # an alias moves on; the version it named when this run started does not
            pinned = f"models:/{self.ref[len('models:/'):].split('@')[0].split('/')[0]}/{self.version}"
        else:
            pinned = self.ref if self.ref.startswith("runs:/") else self.local_dir
        return {PARENT_TAG: self.ref, PARENT_VERSION_TAG: self.version, PARENT_URI_TAG: pinned}


def resolved_version(ref: str) -> str:
    """The registry version a models:/ reference names now (alias / latest resolved), else ""."""
    from mlflow.tracking import MlflowClient

    if not ref.startswith("models:/"):
        return ""
    name, alias = ref[len("models:/"):], ""
    if "@" in name:
        name, alias = name.split("@", 1)
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    name, _, version = name.partition("/")
    if version and version != "latest":
        return version
    return str(max(int(v.version) for v in MlflowClient().search_model_versions(f"name='{name}'")))


def resolve_parent(init: InitSection, task: TaskSection, tracking_uri: str) -> ParentModel:
    """Fetch and check the starting model on the driver; raises before any worker starts."""

    local = local_model_dir(init.from_model, tracking_uri)  # ModelNotFoundError: no such name / alias / folder
    # Building it here costs seconds even for `base` and proves the weights fit their config.
    model = load_model(local)
    missing = [m for m in task.modalities if m not in model.modalities]
    if missing:
        raise ConfigMismatchError(
            f"{init.from_model}: task.modalities {list(task.modalities)} need {missing}, but this model encodes "
            f"only {list(model.modalities)}; choose task.modalities from those or start from another model")
    return ParentModel(init.from_model, local, resolved_version(init.from_model), model.config.to_dict())


# ----------------------------------------------------------------------------- labels and the task
def manifest_vocabulary(plan: DataPlan) -> dict[str, tuple[str, ...]]:
    """Attribute vocabularies from the data set's manifest.json ({} when it has none)."""
    if not plan.manifest:
        return {}
    fs, path = storage.filesystem(plan.manifest)
    try:
        attributes = json.loads(fs.cat(path)).get("attributes") or {}
    except (FileNotFoundError, ValueError):
        return {}
    return {k: tuple(map(str, v)) for k, v in attributes.items()}


def resolve_label(task: TaskSection, plan: DataPlan) -> LabelSpec:
    """Class names: task.classes, else the cartesian product of the fields' manifest vocabularies."""
    fields = task.label_fields
    if task.classes:
        return LabelSpec(fields, tuple(task.classes))
    vocab = manifest_vocabulary(plan)
    unknown = [f for f in fields if f not in vocab]
    if unknown:
        raise ConfigError(f"task.label: {unknown} have no vocabulary in the manifest ({plan.manifest or 'none'}); "
                          f"known attributes: {sorted(vocab) or 'none'}; or list the classes in task.classes")
    classes = tuple(LABEL_JOIN.join(values) for values in itertools.product(*(vocab[f] for f in fields)))
    return LabelSpec(fields, classes)


def make_task(cfg: FinetuneConfig, parent: ParentModel, label: LabelSpec | None):

    t, init_from = cfg.task, parent.local_dir if cfg.init.pretrained else ""
    if t.kind == "retrieval":
        return RetrievalTask(model_config=parent.config, loss=t.loss, modalities=t.modalities,
                             lock=cfg.init.lock, init_from=init_from)
    fusion = "probe" if t.kind == "linear_probe" else t.fusion
    try:
        head = HeadConfig(fusion=fusion, modalities=t.modalities, classes=label.classes, label=label.name,
                          **dataclasses.asdict(t.head))
    except ValueError as exc:
        raise ConfigError(f"task: {exc}") from None
    cls = LinearProbeTask if t.kind == "linear_probe" else ClassificationTask
    return cls(model_config=parent.config, head=head.to_dict(), label=label, init_from=init_from,
               lock=cfg.init.lock)


# ----------------------------------------------------------------------------- the job
def run_names(cfg: FinetuneConfig) -> tuple[str, str]:
    name = cfg.train.run_name or time.strftime(f"finetune-{cfg.task.kind}-%Y%m%d-%H%M%S")
    store = cfg.train.storage or str(workspace.subdir("runs"))
    return name, store if storage.check_scheme(store) == "s3" else storage.filesystem(store)[1]


def open_run(cfg: FinetuneConfig, run_name: str, tags: dict[str, str]) -> str:
    """Reopen the MLflow run of this run name (resume) or start one; log config, lineage, parent."""
    import mlflow

    run_id = tracking.find_run(cfg.mlflow, run_name)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
        if run_id is None:
            mlflow.log_params(tracking.flatten(to_dict(cfg)))
            mlflow.log_dict(to_dict(cfg), "config/finetune.yaml")
        mlflow.set_tags({tracking.RUN_NAME_TAG: run_name, "raybind.job": "finetune",
                         "raybind.task": task_title(cfg), **tags})
        return run.info.run_id


def task_title(cfg: FinetuneConfig) -> str:
    t = cfg.task
    what = {"classification": f"{t.fusion} fusion", "linear_probe": "linear probe", "retrieval": "retrieval"}[t.kind]
    target = "" if t.kind == "retrieval" else f" of {t.label}"
    return f"{what}{target} from {'+'.join(t.modalities)}" + ("" if cfg.init.pretrained else " (from scratch)")


def prepare(cfg: FinetuneConfig):
    """Every check that needs no worker: data, tracking, the starting model, labels, the task."""
    data = resolve_data(cfg.data)
    uri = tracking.configure(cfg.mlflow)
    parent = resolve_parent(cfg.init, cfg.task, uri)
    label = None if cfg.task.kind == "retrieval" else resolve_label(cfg.task, data)
    return data, uri, parent, label, make_task(cfg, parent, label)


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Train, evaluate, register; returns the job summary (and prints the comparison table)."""
    import ray


    started = time.perf_counter()
    data, uri, parent, label, task = prepare(cfg)
    run_name, store = run_names(cfg)
    ensure_ray()
    data.stats = ReadStats()
    lineage = tracking.lineage_tags(data.shard_urls, data.manifest, ray.cluster_resources())
    run_id = open_run(cfg, run_name, {**lineage, **parent.tags()})
    optim = dataclasses.replace(cfg.optim, backbone_lr_scale=cfg.init.backbone_lr_scale if cfg.init.pretrained else 1.0)
    spec = LoopSpec(task=task, train=cfg.train, optim=optim, tracking_uri=uri, run_id=run_id,
                    prefetch_batches=cfg.data.prefetch_batches)
    t = cfg.train
    stream = TrainStream(data=data, config=dataclasses.replace(cfg.data, modalities=task.modalities),
                         spec_dict=parent.config["inputs"], run_dir=storage.join(store, run_name),
                         samples_needed=t.steps * t.batch_size * t.num_workers * cfg.optim.accum_steps,
                         label_fields=label.fields if label else ())
    try:  # decoding the cache (prepared) can fail too: the run is then marked FAILED like any other error
        result = build_trainer(cfg, spec, stream.prepared(), run_name, store).fit()
    except BaseException:
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).set_terminated(run_id, "FAILED")
        raise
    summary = finish(cfg, run_id, uri, data, parent, label, result)
    summary.update({"job": "finetune", "task": task_title(cfg), "run_name": run_name,
                    "storage": storage.join(store, run_name), "seconds": round(time.perf_counter() - started, 1)})
    print(summary["table"])
    return summary


def finish(cfg: FinetuneConfig, run_id: str, uri: str, data: DataPlan, parent: ParentModel,
           label: LabelSpec | None, result) -> dict:
    """Evaluate the last checkpoint on the held-out split, register it, close the MLflow run."""
    import mlflow
    from mlflow.tracking import MlflowClient


    client = MlflowClient(uri)
    summary: dict = {"mlflow_run_id": run_id, "tracking_uri": uri, "parent": parent.tags()}
    if result.checkpoint is None:
        client.set_terminated(run_id, "FAILED")
        raise RuntimeError(f"fine-tuning produced no checkpoint (error: {result.error})")
    with tempfile_dir() as local:
        fetched = Path(fetch_checkpoint_model(result.checkpoint.path, local))
        summary["steps"] = json.loads((fetched.parent / "state.json").read_text())["step"]
        # MLflow files a pyfunc artifact folder under its own base name, and registry.local_model_dir
        # reads `artifacts/binding`: stage the folder under that name so the registered model reloads.
        model_dir = str(fetched.rename(fetched.parent / "binding"))
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({f"data/skipped/{k}": v for k, v in data.skip_counts().items()})
            report = evaluate(cfg, model_dir, parent, label, data.eval_urls) if cfg.eval.enabled else {}
            summary["eval"], summary["table"] = report.get("headline", {}), report.get("table", "(eval disabled)")
            if cfg.mlflow.registered_model:
                tags = {**parent.tags(), "raybind.task": task_title(cfg), "raybind.steps": str(summary["steps"])}
                summary["registered"] = register_model(model_dir, cfg.mlflow.registered_model, run_id, tags=tags)
    client.set_terminated(run_id, "FINISHED")
    return summary


# ----------------------------------------------------------------------------- evaluation (driver)
def load_heldout(urls: str, split: str, modalities, spec, label_fields, max_samples: int) -> dict:
    """Up to `max_samples` decoded held-out samples (file order) as one batch of numpy arrays."""
    import numpy as np


    reader = ReaderConfig(modalities=tuple(modalities), split=split, shuffle_shards=False, shuffle_window=0,
                          label_fields=tuple(label_fields))
    parts = list(read_shards(urls, config=reader, spec=spec).limit(max_samples)
                 .iter_batches(batch_size=256, batch_format="numpy"))
    if not parts:
        raise ValueError(f"{urls}: no samples in split {split!r}")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def evaluate(cfg: FinetuneConfig, model_dir: str, parent: ParentModel, label: LabelSpec | None, urls: str) -> dict:
    """Score the fine-tuned artefact on the held-out split and log it into the active MLflow run."""
    import tempfile

    import mlflow

    folder = Path(tempfile.mkdtemp(prefix="raybind-finetune-eval-"))
    report = (evaluate_retrieval(cfg, model_dir, parent, urls) if label is None
              else evaluate_classification(cfg, model_dir, label, urls, folder))
    mlflow.log_metrics(report.pop("metrics"))
    (folder / "eval_report.json").write_text(json.dumps(report, indent=1, default=str))
    for path in sorted(folder.iterdir()):
        mlflow.log_artifact(str(path), "eval")
    report["report_dir"] = str(folder)
    return report


def predict(model, batch: dict, modalities, batch_size: int):
    import numpy as np
    import torch

    preds = []
    with torch.no_grad():
        for start in range(0, len(batch["key"]), batch_size):
            window = slice(start, start + batch_size)
            inputs = {m: torch.as_tensor(batch[m][window]) for m in modalities}
            masks = {m: torch.as_tensor(batch[f"{m}_mask"][window]) for m in modalities}
            preds.append(model(inputs, masks).argmax(1).numpy())
    return np.concatenate(preds)


def evaluate_classification(cfg: FinetuneConfig, model_dir: str, label: LabelSpec, urls: str, folder: Path) -> dict:
    """Accuracy, macro-F1 and a confusion-matrix plot; the majority class is the baseline to beat."""
    import numpy as np


    model = load_classifier(model_dir).eval()
    mods = model.head_config.modalities
    batch = load_heldout(urls, cfg.eval.split, mods, model.backbone.config.inputs, label.fields, cfg.eval.max_samples)
    present = np.stack([batch[f"{m}_mask"] for m in mods]).any(0)
    truth = np.where(present, label.ids(batch).numpy(), -1)
    scores = classification_metrics(predict(model, batch, mods, cfg.eval.batch_size), truth, len(label.classes))
    known = truth[truth >= 0]
    majority = float(np.bincount(known).max() / len(known)) if len(known) else 0.0
    plot_confusion(scores.confusion, label, folder / "confusion_matrix.png")
    headline = {"accuracy": round(scores.accuracy, 4), "macro_f1": round(scores.macro_f1, 4),
                "majority_class_accuracy": round(majority, 4), "samples": scores.support}
    rows = [["accuracy", f"{scores.accuracy:.3f}", f"{majority:.3f}", f"{1 / len(label.classes):.3f}"],
            ["macro-F1", f"{scores.macro_f1:.3f}", "", ""]]
    return {"headline": headline, "confusion": scores.confusion.tolist(), "classes": list(label.classes),
            "metrics": {f"eval/{k}": float(v) for k, v in headline.items()},
            "table": markdown_table(["metric", "fine-tuned", "majority class", "chance"], rows)}


def evaluate_retrieval(cfg: FinetuneConfig, model_dir: str, parent: ParentModel, urls: str) -> dict:
    """R@1/5/10 and median rank both ways over the pair, for the starting model and the tuned one."""

    pair, e = cfg.task.modalities, cfg.eval
    tuned, start = load_model(model_dir).eval(), load_model(parent.local_dir).eval()
    # Attribute columns let a ShapesWorld duplicate count as a hit (as `raybind evaluate` scores);
    # on data without them only the sample itself matches.
    batch = load_heldout(urls, e.split, pair, tuned.config.inputs, tuple(shapesworld.ATTRIBUTES), e.max_samples)
    after = all_retrieval(embed_all(tuned, batch, pair, e.batch_size), batch)
    before = all_retrieval(embed_all(start, batch, pair, e.batch_size), batch)
    metrics = {**flat_metrics(after, {}),
               **{k.replace("eval/", "eval/start_model/"): v for k, v in flat_metrics(before, {}).items()}}
    rows = [[d, *(f"{before[d][k]:.3f} -> {after[d][k]:.3f}" for k in ("R@1", "R@5", "R@10"))] for d in after]
    return {"headline": {f"{d}/{k}": round(r[k], 4) for d, r in after.items() for k in ("R@1", "R@5", "R@10")},
            "retrieval": after, "start_model_retrieval": before, "metrics": metrics,
            "table": markdown_table(["direction", "R@1 start -> tuned", "R@5", "R@10"], rows)}


def plot_confusion(confusion, label: LabelSpec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)  # rows: recall per true class
    n = len(label.classes)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * n + 2), max(4, 0.45 * n + 1.5)))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), label.classes, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(n), label.classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=f"{label.name}: confusion (row-normalised)")
    fig.colorbar(im)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])
