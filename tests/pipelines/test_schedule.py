"""Optimiser groups and the learning-rate schedule (no Ray)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.core.config import ConfigError
from pipelines.training.config import OptimConfig
from pipelines.training.schedule import lr_factor, make_optimizer, make_scheduler, param_groups


class Finetuned(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 2)


def lrs_by_param(module: nn.Module, optimizer) -> dict[str, tuple[float, float]]:
    """parameter name -> (lr, weight_decay) of the group that holds it."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {name: (group_of[id(p)]["lr"], group_of[id(p)]["weight_decay"]) for name, p in module.named_parameters()}


def test_backbone_learns_at_a_fraction_of_the_head_lr():
    module = Finetuned()
    optimizer = make_optimizer(module, OptimConfig(lr=1e-2, weight_decay=0.1, backbone_lr_scale=0.1))
    got = lrs_by_param(module, optimizer)
    assert got["head.weight"] == (1e-2, 0.1) and got["head.bias"] == (1e-2, 0.0)
    assert got["backbone.0.weight"] == pytest.approx((1e-3, 0.1))
    assert got["backbone.1.weight"] == pytest.approx((1e-3, 0.0))  # a norm: no decay
    scheduler = make_scheduler(optimizer, 100, OptimConfig(lr=1e-2, warmup_steps=10))
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    factor = lr_factor(5, 100, OptimConfig(lr=1e-2, warmup_steps=10))
    got = lrs_by_param(module, optimizer)  # the schedule scales every group from its own lr
    assert got["head.weight"][0] == pytest.approx(1e-2 * factor)
    assert got["backbone.0.weight"][0] == pytest.approx(1e-3 * factor)


def test_frozen_parameters_are_left_out():
    module = Finetuned()
    module.backbone.requires_grad_(False)
    optimizer = make_optimizer(module, OptimConfig())
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in module.head.parameters()}


@pytest.mark.parametrize("scale", [0.0, 1.5])
def test_backbone_lr_scale_must_be_a_fraction(scale):
    with pytest.raises((ConfigError, ValueError), match="backbone_lr_scale"):
        OptimConfig(backbone_lr_scale=scale)


def test_the_optimizer_is_fused_and_steps_like_plain_adamw():
    torch.manual_seed(0)
    fused_model, plain_model = Finetuned(), Finetuned()
    plain_model.load_state_dict(fused_model.state_dict())
    start = {k: v.clone() for k, v in fused_model.state_dict().items()}
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, backbone_lr_scale=0.5)
    fused = make_optimizer(fused_model, cfg)
    plain = torch.optim.AdamW(param_groups(plain_model, cfg.weight_decay, cfg.lr, cfg.backbone_lr_scale),
                              lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    assert fused.defaults["fused"] is True
    x = torch.randn(16, 4)
    for _ in range(5):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            model.head(model.backbone(x)).square().mean().backward()
            optimizer.step()
    for (name, a), b in zip(fused_model.state_dict().items(), plain_model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
        assert not torch.equal(a, start[name]), f"{name} did not move"
