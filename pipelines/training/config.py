"""Small typed configs shared by the training jobs (pretrain, finetune)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.core.config import require


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    accum_steps: int = 1  # micro-batches per optimiser step
    # Parameters under the task module's `backbone` (fine-tuning: the pretrained binding model) learn at
    # lr x this; the new head at lr. Set by `raybind finetune` from init.backbone_lr_scale.
    backbone_lr_scale: float = 1.0

    def __post_init__(self):
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", "must be in [0, 1)")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")
        require(self.accum_steps >= 1, "accum_steps", "must be >= 1")
        require(0 < self.backbone_lr_scale <= 1, "backbone_lr_scale", f"must be in (0, 1], got {self.backbone_lr_scale}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300  # optimiser steps
    batch_size: int = 64  # per worker and micro-batch
    num_workers: int = 2
    cpus_per_worker: float = 0.5  # < 1 on small machines leaves CPUs for Ray Data decoding
    use_gpu: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    torch_threads: int = 0  # per worker; 0 = cpus_per_worker rounded up
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 1  # worker-group restarts from the latest checkpoint
    run_name: str = ""  # "" = <job>-<timestamp>; the same name resumes that run
    storage: str = ""  # Ray Train storage: "" = .raybind/runs, or s3://bucket/prefix
    log_checkpoints_to_mlflow: bool = True
    seed: int = 0

    def __post_init__(self):
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.batch_size >= 2, "batch_size", "must be >= 2 (contrastive losses need negatives)")
        require(self.num_workers >= 1, "num_workers", "must be >= 1")
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        require(self.log_every >= 1, "log_every", "must be >= 1")
        require(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        require(self.max_failures >= 0, "max_failures", "must be >= 0")


@dataclass(frozen=True)
class EvalSection:
    """Evaluation of the last checkpoint on the held-out split, after training."""

    enabled: bool = True
    split: str = "test"
    max_samples: int = 512
    batch_size: int = 128
