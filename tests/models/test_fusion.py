"""Fusion modules: output shapes, absent modalities never leak into a sample's output, gradients flow."""

from __future__ import annotations

import pytest
import torch

from models.fusion import AttentionFusion, BottleneckFusion, LateFusion

B, OUT = 4, 5
DIMS = {"image": 16, "text": 12, "audio": 8}
TOKENS = {"image": 6, "text": 5, "audio": 3}
FUSIONS = {
    "late": lambda: LateFusion(DIMS, OUT, hidden_dim=32),
    "attention": lambda: AttentionFusion(DIMS, OUT, width=32, heads=4, layers=2),
    "bottleneck": lambda: BottleneckFusion(DIMS, OUT, width=32, heads=4, layers=2, num_bottlenecks=2),
}


def features(tokens: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn((B, TOKENS[m], d) if tokens else (B, d), generator=gen) for m, d in DIMS.items()}


MASKS = {"image": torch.tensor([True, True, False, True]),
         "text": torch.tensor([True, False, True, False]),
         "audio": torch.tensor([False, True, True, False])}


@pytest.mark.parametrize("kind", FUSIONS)
@pytest.mark.parametrize("tokens", [False, True])
def test_output_shape(kind, tokens):
    torch.manual_seed(0)
    fusion = FUSIONS[kind]().eval()
    out = fusion(features(tokens), MASKS)
    assert out.shape == (B, OUT) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert fusion(features(tokens)).shape == (B, OUT)  # no masks: everything present


@pytest.mark.parametrize("kind", FUSIONS)
@pytest.mark.parametrize("tokens", [False, True])
def test_absent_modalities_do_not_influence_the_output(kind, tokens):
    torch.manual_seed(0)
    fusion = FUSIONS[kind]().eval()
    x = features(tokens)
    with torch.no_grad():
        before = fusion(x, MASKS)
        changed = {m: v.clone() for m, v in x.items()}
        for m, mask in MASKS.items():
            changed[m][~mask] = float("nan")  # garbage where absent
        after = fusion(changed, MASKS)
    torch.testing.assert_close(after, before)
    with torch.no_grad():  # but present values do matter
        changed = {m: v.clone() for m, v in x.items()}
        changed["image"][0] += 1.0
        moved = fusion(changed, MASKS)
    assert not torch.allclose(moved[0], before[0]) and torch.allclose(moved[1:], before[1:])


@pytest.mark.parametrize("kind", FUSIONS)
def test_a_modality_missing_from_inputs_counts_as_absent(kind):
    torch.manual_seed(0)
    fusion = FUSIONS[kind]().eval()
    x = features(False)
    masks = {**MASKS, "audio": torch.zeros(B, dtype=torch.bool)}
    with torch.no_grad():
        full = fusion(x, masks)
        dropped = fusion({m: v for m, v in x.items() if m != "audio"}, masks)
    torch.testing.assert_close(dropped, full)


@pytest.mark.parametrize("kind", FUSIONS)
def test_gradients_reach_present_inputs(kind):
    torch.manual_seed(0)
    fusion = FUSIONS[kind]()
    x = {m: v.requires_grad_(True) for m, v in features(True).items()}
    fusion(x, MASKS).sum().backward()
    for m, mask in MASKS.items():
        grad = x[m].grad
        assert grad[mask].abs().sum() > 0, m
        assert grad[~mask].abs().sum() == 0, m


def test_sample_with_nothing_present_is_finite():
    fusion = FUSIONS["bottleneck"]().eval()
    none = {m: torch.zeros(B, dtype=torch.bool) for m in DIMS}
    assert torch.isfinite(fusion(features(True), none)).all()


def test_unknown_modality_is_rejected():
    with pytest.raises(ValueError, match="input_dims"):
        LateFusion({"depth": 4}, OUT)
