"""The Ray Train loop: step, log, checkpoint. Every objective comes in as a `Task`.

Runs on each training worker. Rank 0 logs metrics to MLflow (by run id) and writes checkpoints;
all ranks call `ray.train.report` at checkpoint time only, since it is a barrier.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.data.read import to_torch_batches
from pipelines.training.config import OptimConfig, TrainConfig
from pipelines.training.schedule import make_optimizer, make_scheduler
from pipelines.training.state import (
    CHECKPOINT_PREFIX,
    TrainState,
    load_train_state,
    save_train_state,
    verify_checkpoint,
    write_checksums,
)
from pipelines.training.tasks import Task, unwrap


@dataclass(frozen=True)
class LoopSpec:
    """Everything a worker needs, picklable."""

    task: Task
    train: TrainConfig
    optim: OptimConfig
    tracking_uri: str
    run_id: str
    dataset: str = "train"
    prefetch_batches: int | None = None  # DataConfig.prefetch_batches


@dataclass
class Timing:
    """Time spent since the last log: waiting for data, and in whole steps (data wait included)."""

    wait: float = 0.0
    total: float = 0.0
    steps: int = 0

    def reset(self) -> None:
        self.wait, self.total, self.steps = 0.0, 0.0, 0


# ----------------------------------------------------------------------------- setup
def autocast(spec: LoopSpec, device: torch.device):
    use_bf16 = spec.train.precision == "bf16" or (spec.train.precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def set_threads(train: TrainConfig) -> None:
    torch.set_num_threads(train.torch_threads or max(1, math.ceil(train.cpus_per_worker)))


def restore(spec: LoopSpec, module, optimizer, scheduler) -> TrainState:
    """Load the newest intact checkpoint: Ray Train's latest one, or, when that one was cut short
    (a node lost while it was written), the newest one before it that matches its checksums."""
    import ray.train

    latest = ray.train.get_checkpoint()
    if latest is None:
        return TrainState(mlflow_run_id=spec.run_id)
    for checkpoint in [latest, *older_checkpoints(latest)]:
        with checkpoint.as_directory() as directory:
            problem = verify_checkpoint(Path(directory))
            if problem is None:
                spec.task.load_weights(module, Path(directory) / "model")
                state = load_train_state(Path(directory), optimizer, scheduler)
                print(f"[raybind] resumed at step {state.step}, {state.samples_seen} samples consumed")
                return state
        print(f"[raybind] warning: skipping checkpoint {checkpoint.path}: {problem}")
    raise RuntimeError(f"no intact checkpoint under {Path(latest.path).parent}: move the run folder away "
                       "or pick a new train.run_name")


def older_checkpoints(latest) -> list:
    """The checkpoints of `latest`'s run that are older than it, newest first (same storage)."""
    import pyarrow.fs
    import ray.train

    run_dir = latest.path.rstrip("/").rsplit("/", 1)[0]
    infos = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(run_dir))
    names = sorted((i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith(CHECKPOINT_PREFIX)), reverse=True)
    current = latest.path.rstrip("/").rsplit("/", 1)[1]
    return [ray.train.Checkpoint(path=f"{run_dir}/{n}", filesystem=latest.filesystem) for n in names if n < current]


# ----------------------------------------------------------------------------- data
def batch_stream(spec: LoopSpec, device: torch.device):
    """Endless iterator of torch batches from this worker's dataset shard (stops when data ends)."""
    import ray.train

    shard = ray.train.get_dataset_shard(spec.dataset)
    # drop_last: every rank must see equal batch sizes for the gathered contrastive loss.
    yield from to_torch_batches(shard, spec.train.batch_size, drop_last=True, device=str(device),
                                prefetch_batches=spec.prefetch_batches)


def next_batch(stream, timing: Timing):
    start = time.perf_counter()
    batch = next(stream, None)
    timing.wait += time.perf_counter() - start
    return batch


# ----------------------------------------------------------------------------- step, log, checkpoint
def train_step(spec: LoopSpec, module, optimizer, scheduler, stream, timing: Timing, ctx) -> dict | None:
    """One optimiser step over `accum_steps` micro-batches. None when the data ran out."""
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    optimizer.zero_grad(set_to_none=True)
    for _ in range(spec.optim.accum_steps):
        batch = next_batch(stream, timing)
        if batch is None:
            return None
        with autocast(spec, ctx["device"]):
            out = spec.task.compute(module, batch, ctx["rank"], ctx["world_size"])
        (out.loss / spec.optim.accum_steps).backward()
        for k, v in out.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v / spec.optim.accum_steps
    if spec.optim.grad_clip > 0:
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(module.parameters(), spec.optim.grad_clip))
    optimizer.step()
    scheduler.step()
    clamp = getattr(unwrap(module), "clamp_logit_scale_", None)
    if clamp is not None:  # CLIP keeps the temperature <= 100 after every update
        clamp()
    metrics["lr"] = scheduler.get_last_lr()[0]
    timing.total += time.perf_counter() - start
    timing.steps += 1
    return metrics


def mean_over_ranks(metrics: dict[str, float], world_size: int) -> dict[str, float]:
    """Each rank's loss terms are its share of the global batch: average them for logging."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(values)
    return {k: float(v) / world_size for k, v in zip(keys, values, strict=True)}


class MetricLogger:
    """Rank 0 sends metrics to the MLflow run in batches; other ranks stay silent."""

    def __init__(self, spec: LoopSpec, rank: int):
        self.enabled = rank == 0 and bool(spec.run_id)
        self.spec = spec
        if self.enabled:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(spec.tracking_uri)
            # How the workers ran, beside the run's throughput figures (see pretrain.train_worker_env).
            self.client.set_tag(spec.run_id, "raybind.torch_threads", str(torch.get_num_threads()))
            self.client.set_tag(spec.run_id, "raybind.omp_wait_policy", os.environ.get("OMP_WAIT_POLICY", "unset"))
            # A resumed run replays the steps since its last checkpoint; they were logged already,
            # and a second point at the same step would make the curves ambiguous.
            history = self.client.get_metric_history(spec.run_id, "train/loss")
            self.logged_up_to = max((m.step for m in history), default=0)

    def log(self, state: TrainState, metrics: dict[str, float], timing: Timing, global_batch: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        extra = {"samples_per_s": global_batch * timing.steps / max(timing.total, 1e-9),
                 "data_wait_fraction": timing.wait / max(timing.total, 1e-9),
                 "samples_seen": float(state.samples_seen)}
        replayed = state.step <= self.logged_up_to
        if not replayed:
            rows = [Metric(f"train/{k}", float(v), now, state.step) for k, v in {**metrics, **extra}.items()]
            self.client.log_batch(self.spec.run_id, metrics=rows, synchronous=True)
        print(f"[raybind] step {state.step}/{self.spec.train.steps} loss {metrics.get('loss', float('nan')):.4f} "
              f"{extra['samples_per_s']:.1f} samples/s, data wait {extra['data_wait_fraction']:.0%}"
              + (" (replayed after a restart: logged before)" if replayed else ""))


def save_checkpoint(spec: LoopSpec, module, optimizer, scheduler, state: TrainState, rank: int,
                    metrics: dict[str, float]) -> None:
    import ray.train

    name = f"checkpoint_step_{state.step:08d}"
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            spec.task.export(module, Path(tmp) / "model")
            save_train_state(Path(tmp), optimizer, scheduler, state)
            write_checksums(Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            if spec.train.log_checkpoints_to_mlflow and spec.run_id:
                from mlflow.tracking import MlflowClient

                MlflowClient(spec.tracking_uri).log_artifacts(spec.run_id, tmp, f"checkpoints/{name}")
        ray.train.report({"step": state.step, **metrics}, checkpoint=checkpoint, checkpoint_dir_name=name)


# ----------------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    spec: LoopSpec = config["spec"]
    ctx_ray = ray.train.get_context()
    ctx = {"rank": ctx_ray.get_world_rank(), "world_size": ctx_ray.get_world_size(),
           "device": ray.train.torch.get_device()}
    set_threads(spec.train)
    torch.manual_seed(spec.train.seed)
    # Towers of modalities that a job does not feed get no gradient: DDP must not wait for them.
    module = ray.train.torch.prepare_model(spec.task.build(),
                                           parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizer = make_optimizer(module, spec.optim)
    scheduler = make_scheduler(optimizer, spec.train.steps, spec.optim)
    state = restore(spec, module, optimizer, scheduler)
    logger, timing = MetricLogger(spec, ctx["rank"]), Timing()
    stream = batch_stream(spec, ctx["device"])
    global_batch = spec.train.batch_size * ctx["world_size"] * spec.optim.accum_steps
    metrics: dict[str, float] = {}
    while state.step < spec.train.steps:
        step_metrics = train_step(spec, module, optimizer, scheduler, stream, timing, ctx)
        if step_metrics is None:
            print(f"[raybind] data ran out at step {state.step}; stopping early")
            break
        metrics = step_metrics
        state.step += 1
        state.samples_seen += global_batch
        if state.step % spec.train.log_every == 0 or state.step == spec.train.steps:
            logger.log(state, mean_over_ranks(metrics, ctx["world_size"]), timing, global_batch)
            timing.reset()
        if state.step % spec.train.checkpoint_every == 0 or state.step == spec.train.steps:
            save_checkpoint(spec, module, optimizer, scheduler, state, ctx["rank"], metrics)
