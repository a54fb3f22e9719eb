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
from pathlib import Path

from models.checkpoint import ConfigMismatchError, load_model
from models.heads import HeadConfig
from models.reference import is_registry_ref, parse_registry_ref
from pipelines.core import storage, tracking, workspace
from pipelines.core.config import ConfigError, to_dict
from pipelines.core.ray_runtime import ensure_ray
from pipelines.data.read import ReadStats
from pipelines.registry.model_registry import local_model_dir, register_model
from pipelines.training.data import DataPlan, TrainStream, resolve_data
from pipelines.training.finetune_config import FinetuneConfig, InitSection, ParentModel, TaskSection
from pipelines.training.finetune_eval import evaluate
from pipelines.training.finetune_tasks import (
    LABEL_JOIN,
    ClassificationTask,
    LabelSpec,
    LinearProbeTask,
    RetrievalTask,
)
from pipelines.training.loop import LoopSpec
from pipelines.training.pretrain import build_trainer, fetch_checkpoint_model, tempfile_dir


# ----------------------------------------------------------------------------- the pretrained model
def resolved_version(ref: str) -> str:
    """The registry version a models:/ reference names now (an alias resolved), else ""."""
    from mlflow.tracking import MlflowClient

    if not is_registry_ref(ref):
        return ""
    parsed = parse_registry_ref(ref)
    if parsed.alias:
        return str(MlflowClient().get_model_version_by_alias(parsed.name, parsed.alias).version)
    return parsed.version


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
    return tracking.open_job_run(cfg.mlflow, run_name, "finetune", to_dict(cfg),
                                 {"raybind.task": task_title(cfg), **tags})


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
    stream = TrainStream(data=data, config=dataclasses.replace(
                             cfg.data, reader=dataclasses.replace(cfg.data.reader, modalities=task.modalities)),
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


