"""BindingModel: typed outputs in one normalised space, gradients only where modalities are present,
a clamped temperature, LiT-style locking."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import batch_for, random_input, shared, twin, unshared

from models.binding import BindingModel, BindingOutput, split_batch
from models.config import available_models
from models.losses import ContrastiveLoss

B = 3


@pytest.mark.parametrize("name", available_models())
def test_forward_shapes_dtypes_and_normalisation(name):
    torch.manual_seed(0)
    config = twin(name)
    model = BindingModel(config)
    out = model(batch_for(config, config.modalities))
    assert isinstance(out, BindingOutput)
    assert list(out.embeddings) == list(config.modalities)
    for modality, emb in out.embeddings.items():
        assert emb.shape == (B, config.embed_dim) and emb.dtype == torch.float32, modality
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(B))
    assert out.logit_scale.shape == () and out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out.logit_bias is None and out.masks == {}


def test_only_given_modalities_are_encoded():
    config = twin()
    model = BindingModel(config)
    inputs = batch_for(config, ["text", "audio"])
    masks = {"text": torch.tensor([True, False, True])}
    out = model(inputs, masks)
    assert list(out.embeddings) == ["text", "audio"]
    assert out.masks["text"] is masks["text"]


def test_encode_and_tokens_agree_with_forward():
    torch.manual_seed(0)
    config = twin()
    model = BindingModel(config).eval()
    x = random_input(config, "image", B)
    out = model({"image": x})
    torch.testing.assert_close(model.encode("image", x), out.embeddings["image"])
    raw = model.encode("image", x, normalize=False)
    torch.testing.assert_close(raw / raw.norm(dim=-1, keepdim=True), out.embeddings["image"])
    assert model.encode_tokens("audio", random_input(config, "audio", B)).shape == (B, 48, 32)


def _grads_by_tower(model: BindingModel) -> dict[str, bool]:
    """Does any parameter of each encoder/head have a (non-zero) gradient?"""
    has = {}
    for modality in model.modalities:
        params = list(model.encoders[modality].parameters()) + list(model.heads[modality].parameters())
        has[modality] = any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    return has


@pytest.mark.parametrize("present", [("image", "text"), ("text", "audio", "video"), ("image", "text", "audio", "video")])
def test_gradients_reach_present_towers_only(present):
    torch.manual_seed(0)
    model = BindingModel(unshared(twin()))
    out = model(batch_for(model.config, present, batch=4))
    ContrastiveLoss()(out).total.backward()
    grads = _grads_by_tower(model)
    for modality in model.modalities:
        assert grads[modality] == (modality in present), (modality, grads)
        if modality not in present:  # absent towers take no part in the graph at all
            params = list(model.encoders[modality].parameters()) + list(model.heads[modality].parameters())
            assert all(p.grad is None for p in params)
    for modality in present:  # every single parameter of a present tower gets a gradient
        named = list(model.encoders[modality].named_parameters()) + list(model.heads[modality].named_parameters())
        assert all(p.grad is not None for _, p in named), [n for n, p in named if p.grad is None]
    assert model.logit_scale.grad is not None


def test_shared_tower_gets_video_gradients_but_temporal_layers_do_not_get_image_ones():
    torch.manual_seed(0)
    model = BindingModel(shared(twin()))
    assert model.encoders["video"].frame_encoder is model.encoders["image"]
    out = model(batch_for(model.config, ("image", "text"), batch=4))
    ContrastiveLoss()(out).total.backward()
    video = model.encoders["video"]
    assert video.temporal_embedding.grad is None
    assert all(p.grad is None for p in video.temporal.parameters())
    model.zero_grad(set_to_none=True)
    out = model(batch_for(model.config, ("text", "video"), batch=4))
    ContrastiveLoss()(out).total.backward()
    assert model.encoders["image"].vit.positional_embedding.grad is not None  # through the shared frame ViT
    assert model.heads["image"].net.weight.grad is None


def test_logit_scale_is_clamped_like_clip():
    model = BindingModel(twin())
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    scale, bias = model.logit_params()
    assert scale.item() == pytest.approx(100.0) and bias is None
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_siglip_bias_is_a_parameter():
    model = BindingModel(twin(use_logit_bias=True, init_logit_scale=math.log(10)))
    out = model(batch_for(model.config, ["image"]))
    assert out.logit_bias is model.logit_bias and out.logit_bias.item() == -10.0
    assert out.logit_scale.item() == pytest.approx(10.0, rel=1e-5)


def test_lock_freezes_and_keeps_eval_mode():
    torch.manual_seed(0)
    model = BindingModel(unshared(twin()))
    model.lock("text")
    model.train()
    assert model.locked == ("text",)
    assert not model.encoders["text"].training and model.encoders["image"].training
    assert all(not p.requires_grad for p in model.encoders["text"].parameters())
    assert all(not p.requires_grad for p in model.heads["text"].parameters())
    out = model(batch_for(model.config, ("image", "text"), batch=4))
    ContrastiveLoss()(out).total.backward()
    grads = _grads_by_tower(model)
    assert grads["image"] and not grads["text"]


def test_bad_inputs_name_the_problem():
    model = BindingModel(twin())
    with pytest.raises(ValueError, match=r"image: expected input shape \(B, 3, 64, 64\)"):
        model({"image": torch.randn(2, 3, 32, 32)})
    with pytest.raises(ValueError, match="unknown modalities"):
        model({"depth": torch.randn(2, 3)})
    with pytest.raises(ValueError, match="text: expected integer token ids"):
        model.encode("text", torch.randn(2, 32))
    with pytest.raises(ValueError, match="unknown modality 'depth'"):
        model.lock("depth")


def test_split_batch_takes_modalities_and_masks():
    config = twin()
    batch = {"image": random_input(config, "image"), "image_mask": torch.tensor([1, 0]),
             "text": random_input(config, "text"), "key": ["a", "b"], "caption": ["x", "y"]}
    inputs, masks = split_batch(batch)
    assert list(inputs) == ["image", "text"] and list(masks) == ["image"]
    assert masks["image"].dtype == torch.bool and masks["image"].tolist() == [True, False]


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = BindingModel(twin())
    inputs = batch_for(model.config, ("image", "audio"), batch=8)
    loss_fn = ContrastiveLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = loss_fn(model(inputs)).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
