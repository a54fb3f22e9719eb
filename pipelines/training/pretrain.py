"""`raybind pretrain`: contrastive pretraining of a BindingModel on Ray Train, fed by Ray Data,
tracked in MLflow, evaluated and registered.

Resume = the same command with the same `train.run_name`: Ray Train finds the run's latest
checkpoint in its storage, the MLflow run is reopened, and the data stream restarts at the
checkpoint's data position (see `TrainStream`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from models.config import ModelConfig, available_models
from models.spec import MODALITIES
from pipelines.core import storage, tracking, workspace
from pipelines.core.config import require, to_dict
from pipelines.core.ray_runtime import ensure_ray
from pipelines.data.read import ReadStats
from pipelines.eval.evaluate import evaluate_model
from pipelines.registry.model_registry import local_model_dir, register_model
from pipelines.training.config import EvalSection, OptimConfig, TrainConfig
from pipelines.training.data import DataConfig, TrainStream, newest_intact_state, resolve_data
from pipelines.training.loop import LoopSpec, train_loop_per_worker
from pipelines.training.tasks import ContrastiveTask, LossConfig


@dataclass(frozen=True)
class ModelSection:
    name: str = "tiny"  # a registered size (models/configs/NAME.json) or a path to a config JSON
    init_from: str = ""  # start from: a model folder, a checkpoint folder, or models:/NAME@ALIAS
    lock: tuple[str, ...] = ()  # towers kept frozen (LiT-style), e.g. [text]

    def __post_init__(self):
        require(self.name in available_models() or self.name.endswith(".json"), "name",
                f"{self.name!r} is not a registered size ({', '.join(available_models())}) or a .json config")
        for m in self.lock:
            require(m in MODALITIES, "lock", f"{m!r} is not a modality; choose from {', '.join(MODALITIES)}")



@dataclass(frozen=True)
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    mlflow: tracking.TrackingConfig = field(default_factory=tracking.TrackingConfig)

    def __post_init__(self):
        require(len(self.data.reader.modalities) >= 2, "data.reader.modalities",
                "contrastive pretraining needs >= 2")


# ----------------------------------------------------------------------------- preparation
def model_config_dict(cfg: PretrainConfig) -> dict:
    path = Path(cfg.model.name)
    config = ModelConfig.from_file(path) if path.suffix == ".json" else ModelConfig.from_name(cfg.model.name)
    return config.to_dict()


def resolve_init(init_from: str, tracking_uri: str) -> str:
    """A local folder with config.json + model.safetensors, whatever `init_from` names."""

    return local_model_dir(init_from, tracking_uri) if init_from else ""


def run_names(cfg: PretrainConfig) -> tuple[str, str]:
    name = cfg.train.run_name or time.strftime("pretrain-%Y%m%d-%H%M%S")
    store = cfg.train.storage or str(workspace.subdir("runs"))
    if storage.check_scheme(store) != "s3":
        store = storage.filesystem(store)[1]
    return name, store


STEPS_DONE_TAG = "raybind.steps_done"  # set when a run finishes: the step its model was taken at


def open_run(cfg: PretrainConfig, run_name: str, data_lineage: dict) -> str:
    """Reopen the MLflow run of this run name (resume) or start one; log config and lineage."""
    return tracking.open_job_run(cfg.mlflow, run_name, "pretrain", to_dict(cfg), data_lineage)


def finished_already(cfg: PretrainConfig, run_name: str, run_dir: str, uri: str) -> dict | None:
    """The summary of a FINISHED run of this name that already reached train.steps, else None:
    running the same command again changes nothing (raise train.steps to continue it)."""
    from mlflow.tracking import MlflowClient

    run_id = tracking.find_run(cfg.mlflow, run_name)
    run = MlflowClient().get_run(run_id) if run_id else None
    if run is None or run.info.status != "FINISHED":
        return None
    steps = run.data.tags.get(STEPS_DONE_TAG)
    if steps is None:  # a run finished before the tag existed: its newest checkpoint says
        state = newest_intact_state(run_dir)
        steps = state["step"] if state else None
    if steps is None or int(steps) < cfg.train.steps:
        return None
    print(f"[raybind] pretrain: run {run_name!r} already finished at step {steps} (MLflow run {run_id}); "
          "nothing to do. Raise train.steps to continue it, or pick a new train.run_name.", file=sys.stderr)
    return {"job": "pretrain", "run_name": run_name, "status": "already finished", "steps": int(steps),
            "mlflow_run_id": run_id, "storage": run_dir, "mlflow_ui": tracking.ui_command(uri)}


# ----------------------------------------------------------------------------- the job
def train_worker_env() -> dict[str, str]:
    """Environment of the Ray Train workers: the storage settings, and OpenMP's passive wait policy
    unless this process sets OMP_WAIT_POLICY itself.

    Why passive: between parallel regions torch's OpenMP threads spin by default. Where the cores are
    shared (Ray Data decode tasks beside the trainer, as on a CPU node that decodes and trains), a
    spinning thread keeps a core from the decoder, and a thread that lost its core holds its team up at
    the next barrier (benchmarks/train_throughput.py (b) measures it; docs/design-notes.md). One
    thread per worker never spins, so the demo's 2 x 1 layout is unaffected.

    Why no print patch: Ray Train replaces `print` in its workers with a logger call that also tees to
    the (redirected) stdout, so every step line reached the driver twice.
    """
    return {**storage.worker_env(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def build_trainer(cfg: PretrainConfig, spec, stream: TrainStream, run_name: str, store: str):
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=store, worker_runtime_env={"env_vars": train_worker_env()},
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints)),
        datasets={"train": stream},
    )


def run_pretrain(cfg: PretrainConfig, dataset=None) -> dict:
    """Train, evaluate, register; returns the job summary.

    `dataset`: optional ready `ray.data.Dataset` of decoded rows (e.g. materialized tensors, for
    benchmarks) fed to the workers instead of the shard stream; it has no data position, so a resumed
    run starts it again from its first row. `data.train` still names the shards (lineage, eval)."""
    import ray

    started = time.perf_counter()
    model_dict = model_config_dict(cfg)  # fail on a bad model name before anything starts
    data = resolve_data(cfg.data)
    run_name, store = run_names(cfg)
    uri = tracking.configure(cfg.mlflow)
    done = finished_already(cfg, run_name, storage.join(store, run_name), uri)
    if done is not None:
        return done
    init_dir = resolve_init(cfg.model.init_from, uri)
    ensure_ray()
    data.stats = ReadStats()  # skip counters, filled by the read tasks (an actor owned by this driver)
    lineage = tracking.lineage_tags(data.shard_urls, data.manifest, ray.cluster_resources())
    run_id = open_run(cfg, run_name, lineage)
    # Said now, not only in the summary: a job killed later still tells where its results are.
    print(f"[raybind] pretrain {run_name}: MLflow run {run_id} at {uri}; checkpoints in "
          f"{storage.join(store, run_name)}", file=sys.stderr, flush=True)
    task = ContrastiveTask(model_config=model_dict, loss=cfg.loss, modalities=cfg.data.reader.modalities,
                           lock=cfg.model.lock, init_from=init_dir)
    spec = LoopSpec(task=task, train=cfg.train, optim=cfg.optim, tracking_uri=uri, run_id=run_id,
                    prefetch_batches=cfg.data.prefetch_batches)
    stream = dataset if dataset is not None else TrainStream(
        data=data, config=cfg.data, spec_dict=model_dict["inputs"], run_dir=storage.join(store, run_name),
        samples_needed=cfg.train.steps * cfg.train.batch_size * cfg.train.num_workers * cfg.optim.accum_steps)
    try:  # decoding the cache (prepared) can fail too: the run is then marked FAILED like any other error
        stream = stream if dataset is not None else stream.prepared()
        result = build_trainer(cfg, spec, stream, run_name, store).fit()
    except BaseException as exc:
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    checkpoint_dir = result.checkpoint.path if result.checkpoint else None
    summary = finish(cfg, run_id, uri, data, checkpoint_dir, result, evaluate_model, register_model)
    summary.update({"job": "pretrain", "run_name": run_name, "storage": storage.join(store, run_name),
                    "seconds": round(time.perf_counter() - started, 1)})
    return summary


def finish(cfg, run_id, uri, data, checkpoint_dir, result, evaluate_model, register_model) -> dict:
    """Evaluate the last checkpoint, log skipped-sample counts, register the model, close the run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    summary: dict = {"mlflow_run_id": run_id, "tracking_uri": uri, "mlflow_ui": tracking.ui_command(uri)}
    if checkpoint_dir is None:
        client.set_terminated(run_id, "FAILED")
        raise RuntimeError(f"training produced no checkpoint (error: {result.error})")
    with tempfile_dir() as local:
        model_dir = fetch_checkpoint_model(checkpoint_dir, local)
        steps = json.loads((Path(model_dir).parent / "state.json").read_text())["step"]
        summary["steps"] = steps
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({f"data/skipped/{k}": v for k, v in data.skip_counts().items()})
            if cfg.eval.enabled:
                report = evaluate_model(model_dir, data.eval_urls, split=cfg.eval.split,
                                        max_samples=cfg.eval.max_samples, batch_size=cfg.eval.batch_size,
                                        log_to_mlflow=True)
                summary["eval"] = report["headline"]
                summary["retrieval_R@1"] = {pair: round(r["R@1"], 4) for pair, r in report["retrieval"].items()}
                summary["zero_shot"] = report["zero_shot"]
            if cfg.mlflow.registered_model:
                summary["registered"] = register_model(model_dir, cfg.mlflow.registered_model, run_id,
                                                       tags={"raybind.steps": str(steps)})
    client.set_tag(run_id, STEPS_DONE_TAG, str(steps))
    client.set_terminated(run_id, "FINISHED")
    return summary


def fetch_checkpoint_model(checkpoint_path: str, local: str) -> str:
    """Copy a (possibly remote) checkpoint to `local`; returns its model folder."""
    fs, path = storage.filesystem(checkpoint_path if "://" in checkpoint_path or checkpoint_path.startswith("/")
                                  else checkpoint_path)
    fs.get(path.rstrip("/") + "/", local.rstrip("/") + "/", recursive=True)
    return str(Path(local) / "model")


def tempfile_dir():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="raybind-ckpt-")
