"""AdamW with decoupled weight decay on matrices only, and linear warmup + cosine decay."""

from __future__ import annotations

import math

import torch

from pipelines.training.config import OptimConfig


def param_groups(module: torch.nn.Module, weight_decay: float, lr: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """No weight decay on biases, norms, embeddings' scales and the logit scale (as CLIP does); a
    module's `backbone.*` parameters at lr x backbone_lr_scale (DDP's `module.` prefix ignored)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim < 2 or "logit_scale" in name or "logit_bias" in name)
        backbone = name.removeprefix("module.").startswith("backbone.")
        groups.setdefault((decays, backbone), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0,
             "lr": lr * (backbone_lr_scale if backbone else 1.0)}
            for (decays, backbone), params in sorted(groups.items(), reverse=True)]


def make_optimizer(module: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over every tensor) where torch has that kernel: CPU and CUDA.
    Why: torch's CPU default steps tensor by tensor in Python, which on a small model costs a
    noticeable share of each training step; one fused kernel removes that (figures in
    docs/design-notes.md)."""
    groups = param_groups(module, cfg.weight_decay, cfg.lr, cfg.backbone_lr_scale)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
