"""Classifier heads: every fusion strategy gives logits, absent modalities never leak, the artefact
round-trips (backbone loadable on its own), freezing leaves only the intended towers trainable,
and the metrics match hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import batch_for, twin
from model_helpers import shared as shared_tower

from models.binding import BindingModel
from models.checkpoint import ConfigMismatchError, load_model
from models.heads import (
    Classifier,
    HeadConfig,
    classification_metrics,
    freeze_unused,
    load_classifier,
    save_classifier,
    tower_parameter_ids,
)

CLASSES = ("a", "b", "c")
B = 3


def head(fusion: str, modalities=("image", "audio"), **kw) -> HeadConfig:
    return HeadConfig(fusion=fusion, modalities=modalities, classes=CLASSES, width=32, layers=1, heads=2,
                      hidden_dim=16, num_bottlenecks=2, **kw)


def classifier(fusion: str, modalities=("image", "audio")) -> Classifier:
    torch.manual_seed(0)
    return Classifier(BindingModel(twin()), head(fusion, modalities)).eval()


@pytest.mark.parametrize("fusion", ["early", "late", "middle"])
def test_fusion_logits_and_masked_modality_does_not_leak(fusion):
    model = classifier(fusion, ("image", "audio", "video"))
    inputs = batch_for(model.backbone.config, ["image", "audio", "video"], batch=B)
    masks = {"image": torch.tensor([True, True, True]), "audio": torch.tensor([False, True, True]),
             "video": torch.ones(B, dtype=torch.bool)}
    logits = model(inputs, masks)
    assert logits.shape == (B, len(CLASSES)) and torch.isfinite(logits).all()
    changed = dict(inputs, audio=inputs["audio"] + 5.0)
    again = model(changed, masks)
    torch.testing.assert_close(again[0], logits[0])  # sample 0 has no audio: its audio is never read
    assert not torch.allclose(again[1], logits[1])


def test_probe_reads_one_embedding_linearly():
    model = classifier("probe", ("audio",))
    assert isinstance(model.fusion, torch.nn.Linear) and model.fusion.in_features == model.backbone.embed_dim
    x = batch_for(model.backbone.config, ["audio"], batch=B)
    assert model(x).shape == (B, len(CLASSES))


def test_head_config_is_checked():
    with pytest.raises(ValueError, match="a linear probe reads one modality"):
        head("probe", ("image", "audio"))
    with pytest.raises(ValueError, match="fusion: 'sideways'"):
        head("sideways")
    with pytest.raises(ValueError, match=r"need >= 2 distinct class names"):
        HeadConfig(fusion="late", modalities=("image",), classes=("only",))
    config = twin(audio=None)
    with pytest.raises(ConfigMismatchError, match=r"the head needs \['audio'\]"):
        Classifier(BindingModel(config), head("late"))


@pytest.mark.parametrize("fusion", ["early", "middle", "probe"])
def test_artefact_round_trip(tmp_path, fusion):
    mods = ("image",) if fusion == "probe" else ("image", "audio")
    model = classifier(fusion, mods)
    save_classifier(model, tmp_path / "m")
    again = load_classifier(tmp_path / "m").eval()
    x = batch_for(model.backbone.config, list(mods), batch=B)
    torch.testing.assert_close(again(x), model(x))
    assert again.head_config == model.head_config
    backbone = load_model(tmp_path / "m").eval()  # the folder is still a plain binding model
    torch.testing.assert_close(backbone.encode("image", x["image"]), model.backbone.encode("image", x["image"]))
    with pytest.raises(ConfigMismatchError, match="not a classifier"):
        load_classifier(_plain_model(tmp_path))


def _plain_model(tmp_path):
    from models.checkpoint import save_model

    return save_model(BindingModel(twin()), tmp_path / "plain")


def test_freeze_unused_keeps_only_used_towers_trainable():
    model = BindingModel(twin())
    freeze_unused(model, ["audio"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == tower_parameter_ids(model, ["audio"])
    assert not model.logit_scale.requires_grad
    shared = BindingModel(shared_tower(twin()))
    freeze_unused(shared, ["video"], keep_temperature=True)
    # video shares the image ViT: using video keeps that ViT trainable, and the temperature too
    assert all(p.requires_grad for p in shared.encoders["image"].parameters())
    assert shared.logit_scale.requires_grad and not any(p.requires_grad for p in shared.encoders["text"].parameters())


def test_classification_metrics_by_hand():
    truth = np.array([0, 0, 1, 1, 2, -1])
    pred = np.array([0, 1, 1, 1, 0, 2])  # the last one has no label: ignored
    m = classification_metrics(pred, truth, 3)
    assert m.support == 5 and m.accuracy == pytest.approx(3 / 5)
    assert m.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    f1 = [2 * 1 / (2 + 2), 2 * 2 / (3 + 2), 0.0]  # 2 TP / (predicted + true) per class
    assert m.macro_f1 == pytest.approx(np.mean(f1))
