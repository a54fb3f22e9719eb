"""Checkpoints: safetensors + config.json round trip, tied weights, and mismatches named field by field."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from model_helpers import batch_for, shared, twin, unshared, with_appearance
from safetensors import safe_open

from models.binding import BindingModel
from models.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ConfigMismatchError,
    alias_groups,
    load_model,
    load_state_dict,
    save_model,
)
from models.config import ModelConfig


def _trained_a_little(config: ModelConfig) -> BindingModel:
    """Weights moved away from their init, so a load that silently kept fresh weights would show."""
    torch.manual_seed(0)
    model = BindingModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


@pytest.mark.parametrize("make_config", [lambda: twin(), lambda: unshared(twin()),
                                         lambda: twin("base", use_logit_bias=True)])
def test_round_trip_gives_identical_embeddings(tmp_path, make_config):
    config = make_config()
    model = _trained_a_little(config)
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded = load_model(tmp_path / "m", expected=config).eval()
    assert loaded.config == config
    inputs = batch_for(config, config.modalities, batch=2)
    with torch.no_grad():
        before, after = model(inputs), loaded(inputs)
    for m in config.modalities:
        assert torch.equal(before.embeddings[m], after.embeddings[m]), m
    assert torch.equal(before.logit_scale, after.logit_scale)
    assert (before.logit_bias is None) == (after.logit_bias is None)


def test_shared_tower_is_stored_once_and_tied_again_on_load(tmp_path):
    model = _trained_a_little(shared(twin()))
    save_model(model, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["raybind"] == "raybind-model/1"
    assert "encoders.image.vit.positional_embedding" in keys
    assert not any(k.startswith("encoders.video.frame_encoder.") for k in keys)
    assert "encoders.video.temporal_embedding" in keys
    loaded = load_model(tmp_path)
    assert loaded.encoders["video"].frame_encoder is loaded.encoders["image"]
    groups = alias_groups(loaded.state_dict())
    assert ["encoders.image.vit.positional_embedding", "encoders.video.frame_encoder.vit.positional_embedding"] in groups


def test_appearance_pathway_reloads_tied_to_the_image_tower(tmp_path):
    config = with_appearance(twin())
    model = _trained_a_little(config)
    save_model(model, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:
        assert not any(k.startswith("encoders.video.image_encoder.") for k in f.keys())
    loaded = load_model(tmp_path)
    assert loaded.encoders["video"].image_encoder is loaded.encoders["image"]
    video = torch.randn(2, *config.inputs.shape("video"))
    model.eval(), loaded.eval()
    torch.testing.assert_close(model.encoders["video"](video), loaded.encoders["video"](video))


def test_config_json_is_plain_and_complete(tmp_path):
    config = twin()
    save_model(BindingModel(config), tmp_path)
    data = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert ModelConfig.from_dict(data) == config
    assert data["inputs"]["audio"]["n_mels"] == config.inputs.audio.n_mels


def test_expected_config_mismatch_names_each_field(tmp_path):
    config = twin()
    save_model(BindingModel(config), tmp_path)
    other = dataclasses.replace(config, name="something-else", embed_dim=128,
                                image=dataclasses.replace(config.image, width=64))
    with pytest.raises(ConfigMismatchError) as err:
        load_model(tmp_path, expected=other)
    message = str(err.value)
    assert "embed_dim: checkpoint 64, expected 128" in message
    assert "image.width: checkpoint 32, expected 64" in message
    assert "name" not in message.split("does not match:")[1]  # names alone are not architecture
    assert isinstance(err.value, ValueError)


def test_weights_that_do_not_fit_their_config_are_named(tmp_path):
    config = twin()
    save_model(BindingModel(config), tmp_path)
    data = json.loads((tmp_path / CONFIG_FILE).read_text())
    data["embed_dim"] = 48
    (tmp_path / CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(ConfigMismatchError, match=r"heads.image.net.weight: checkpoint shape \(64, 32\), model \(48, 32\)"):
        load_model(tmp_path)


def test_load_state_dict_names_missing_and_unexpected_keys():
    model = BindingModel(twin())
    state = dict(model.state_dict())
    del state["logit_scale"]
    state["heads.depth.weight"] = torch.zeros(1)
    with pytest.raises(ConfigMismatchError) as err:
        load_state_dict(model, state)
    assert "logit_scale: missing from checkpoint" in str(err.value)
    assert "heads.depth.weight: unexpected in checkpoint" in str(err.value)


def test_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nowhere")
