"""Shared helpers for tests/models (imported by module name: pytest's default `prepend` import mode puts
this folder on sys.path; the spawned distributed workers import it the same way)."""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models.config import ModelConfig, TowerConfig, VideoTowerConfig


def random_input(config: ModelConfig, modality: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *config.inputs.shape(modality))
    if modality == "text":
        return torch.randint(0, config.vocab_size, shape, generator=gen)
    return torch.randn(shape, generator=gen)


def batch_for(config: ModelConfig, modalities, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    return {m: random_input(config, m, batch, seed + i) for i, m in enumerate(modalities)}


def twin(name: str = "tiny", **changes) -> ModelConfig:
    return dataclasses.replace(ModelConfig.from_name(name).tiny_twin(), **changes)


def shared(config: ModelConfig) -> ModelConfig:
    """The config with video frames going through the image tower (ImageBind-style weight sharing)."""
    return dataclasses.replace(config, video=VideoTowerConfig(share_image_tower=True, frame=None,
                                                             temporal_layers=config.video.temporal_layers))


def unshared(config: ModelConfig) -> ModelConfig:
    frame = TowerConfig(width=32, layers=1, heads=2, patch_size=config.image.patch_size)
    return dataclasses.replace(config, video=VideoTowerConfig(share_image_tower=False, frame=frame))


def with_appearance(config: ModelConfig) -> ModelConfig:
    """`config` with a light own frame tower (motion) plus the image tower on the middle frame."""
    frame = TowerConfig(width=32, layers=1, heads=2, patch_size=16)
    return dataclasses.replace(config, video=VideoTowerConfig(
        share_image_tower=False, frame=frame, motion=True, appearance_from_image=True))


# --- distributed loss worker (one process per rank, spawned by test_losses) --------------------------
def loss_worker(rank: int, world_size: int, port: int, payload: str, out_dir: str, anchor: str) -> None:
    """Rank `rank`: take its slice of the global batch, compute both loss kinds, save values and grads."""
    from models.binding import BindingOutput
    from models.losses import ContrastiveLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        data = load_file(payload)
        names = [k for k in data if not k.endswith("_mask") and k != "log_scale"]
        local = data[names[0]].shape[0] // world_size
        rows = slice(rank * local, (rank + 1) * local)
        results = {}
        for kind in ("infonce", "siglip"):
            feats = {m: data[m][rows].clone().requires_grad_(True) for m in names}
            log_scale = data["log_scale"].clone().requires_grad_(True)
            output = BindingOutput(embeddings={m: F.normalize(f, dim=-1) for m, f in feats.items()},
                                   logit_scale=log_scale.exp(), logit_bias=log_scale * 0 - 2.0 if kind == "siglip" else None,
                                   masks={m: data[f"{m}_mask"][rows].bool() for m in names})
            loss = ContrastiveLoss(kind, anchor)(output, rank=rank, world_size=world_size)
            loss.total.backward()
            results[f"{kind}.total"] = loss.total.detach()
            results.update({f"{kind}.pair.{p}": v.detach() for p, v in loss.per_pair.items()})
            results.update({f"{kind}.grad.{m}": f.grad for m, f in feats.items()})
            results[f"{kind}.grad.log_scale"] = log_scale.grad
        save_file({k: v.contiguous() for k, v in results.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()
