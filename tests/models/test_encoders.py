"""Encoders: token and pooled shapes for every registered size's tiny twin, and tower sharing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_helpers import random_input, shared, with_appearance

from models.config import ModelConfig, TowerConfig, VideoTowerConfig, available_models
from models.encoders import EncoderOutput, PatchEncoder, TextEncoder, VideoEncoder, build_encoders

B = 2


def expected_tokens(config: ModelConfig, modality: str) -> int:
    spec = config.inputs
    if modality == "image":
        return (spec.image_size // config.image.patch_size) ** 2
    if modality == "text":
        return spec.context_length
    if modality == "audio":
        p = config.audio.patch_size
        return (spec.audio.n_mels // p) * (spec.audio.num_frames // p)
    return spec.video_frames + (1 if config.video.appearance_from_image else 0)


@pytest.mark.parametrize("name", available_models())
def test_twin_encoders_shapes_and_dtypes(name):
    torch.manual_seed(0)
    config = ModelConfig.from_name(name).tiny_twin()
    encoders = build_encoders(config)
    assert list(encoders) == list(config.modalities)
    for modality, encoder in encoders.items():
        x = random_input(config, modality)
        out = encoder.encode(x)
        assert isinstance(out, EncoderOutput)
        assert out.tokens.shape == (B, expected_tokens(config, modality), 32), modality
        assert out.pooled.shape == (B, 32), modality
        assert out.tokens.dtype == out.pooled.dtype == torch.float32
        assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
        torch.testing.assert_close(encoder(x), out.pooled)
        torch.testing.assert_close(encoder.forward_tokens(x), out.tokens)


def test_video_shares_the_image_tower_module_when_configured():
    config = shared(ModelConfig.from_name("tiny").tiny_twin())
    encoders = build_encoders(config)
    assert encoders["video"].frame_encoder is encoders["image"]

    own = dataclasses.replace(config, video=VideoTowerConfig(
        share_image_tower=False, frame=TowerConfig(width=48, layers=1, heads=2, patch_size=16)))
    encoders = build_encoders(own)
    assert encoders["video"].frame_encoder is not encoders["image"]
    assert encoders["video"].width == 48
    assert encoders["video"].encode(random_input(own, "video")).pooled.shape == (B, 48)


def test_audio_patches_are_single_channel_and_non_square():
    config = ModelConfig.from_name("tiny").tiny_twin()
    audio = build_encoders(config)["audio"]
    assert isinstance(audio, PatchEncoder)
    assert audio.vit.conv1.in_channels == 1
    spec, p = config.inputs.audio, config.audio.patch_size
    assert audio.vit.grid_size == (spec.n_mels // p, spec.num_frames // p)
    assert audio.vit.proj is None  # the shared-space projection lives in BindingModel


def test_text_pools_at_the_end_of_text_token():
    config = ModelConfig.from_name("tiny").tiny_twin()
    text = build_encoders(config)["text"]
    assert isinstance(text, TextEncoder)
    tokens = torch.zeros(3, config.inputs.context_length, dtype=torch.long)
    eot = [4, 9, 31]
    for row, pos in enumerate(eot):
        tokens[row, 1:pos] = 100 + row
        tokens[row, pos] = 49407  # open_clip's <end_of_text> has the largest id
    out = text.encode(tokens)
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(3), torch.tensor(eot)])


def test_video_frame_order_matters():
    """Temporal position embeddings make the video encoder order-aware (a reversed clip differs)."""
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny").tiny_twin()
    video = build_encoders(config)["video"]
    assert isinstance(video, VideoEncoder)
    x = random_input(config, "video")
    assert not torch.allclose(video(x), video(x.flip(1)), atol=1e-5)


def test_motion_channels_are_differences_to_the_next_frame():
    from models.encoders import motion_channels

    x = torch.arange(4, dtype=torch.float32).view(1, 4, 1, 1, 1).expand(1, 4, 3, 2, 2) ** 2  # 0, 1, 4, 9
    diff = motion_channels(x)
    assert diff.shape == x.shape
    assert diff[0, :, 0, 0, 0].tolist() == [1.0, 3.0, 5.0, 5.0]
    assert motion_channels(x[:, :1]).abs().sum() == 0


def test_motion_video_tower_sees_frame_order():
    torch.manual_seed(0)
    frame = TowerConfig(width=32, layers=1, heads=2, patch_size=16)
    config = dataclasses.replace(ModelConfig.from_name("tiny"), video=VideoTowerConfig(
        share_image_tower=False, frame=frame, temporal_layers=0, motion=True))
    video = build_encoders(config, load_pretrained=False)["video"].eval()
    assert video.frame_encoder.vit.conv1.in_channels == 6
    x = torch.randn(2, config.inputs.video_frames, 3, 64, 64)
    # Without the temporal transformer, a plain mean over frames cannot tell the order apart; the
    # motion channels can: playing the clip backwards flips the sign of every difference.
    forward, backward = video(x), video(x.flip(1))
    assert not torch.allclose(forward, backward, atol=1e-4)


def test_motion_needs_the_videos_own_tower():
    with pytest.raises(ValueError, match="^motion: needs the video's own frame tower"):
        VideoTowerConfig(share_image_tower=True, motion=True)


def test_appearance_pathway_runs_the_image_tower_on_the_middle_frame():
    torch.manual_seed(0)
    config = with_appearance(ModelConfig.from_name("tiny").tiny_twin())
    config = dataclasses.replace(config, video=dataclasses.replace(config.video, temporal_layers=0))
    encoders = build_encoders(config, load_pretrained=False).eval()
    video = encoders["video"]
    assert video.image_encoder is encoders["image"] and video.frame_encoder is not encoders["image"]
    x = random_input(config, "video")
    seen = []
    hook = video.image_encoder.register_forward_hook(lambda m, args, output: seen.append(args[0]))
    with torch.no_grad():
        out = video.encode(x)
    hook.remove()
    frames = config.inputs.video_frames
    assert out.tokens.shape == (B, 1 + frames, 32)
    # The image tower sees the middle frame's RGB and nothing else; its projection is the first token.
    torch.testing.assert_close(seen[0], x[:, frames // 2])
    with torch.no_grad():
        appearance = video.ln(video.appearance(encoders["image"](x[:, frames // 2])))
    torch.testing.assert_close(out.tokens[:, 0], appearance)
    # The frame tokens are the plain motion tower's (no temporal transformer mixes them here).
    without = build_encoders(dataclasses.replace(config, video=dataclasses.replace(
        config.video, appearance_from_image=False)), load_pretrained=False)["video"].eval()
    without.load_state_dict({k: v for k, v in video.state_dict().items()
                             if not k.startswith(("image_encoder.", "appearance."))})
    with torch.no_grad():
        torch.testing.assert_close(out.tokens[:, 1:], without.encode(x).tokens)
    torch.testing.assert_close(out.pooled, out.tokens.mean(dim=1))


def test_appearance_pathway_trains_the_shared_image_tower_from_video():
    torch.manual_seed(0)
    config = with_appearance(ModelConfig.from_name("tiny").tiny_twin())
    encoders = build_encoders(config, load_pretrained=False)
    encoders["video"](random_input(config, "video")).sum().backward()
    image_grads = [p.grad for p in encoders["image"].parameters()]
    assert all(g is not None for g in image_grads) and any(g.abs().sum() > 0 for g in image_grads)


def test_appearance_pathway_config_errors():
    with pytest.raises(ValueError, match="^appearance_from_image: needs the video's own frame tower"):
        VideoTowerConfig(share_image_tower=True, appearance_from_image=True)
    tiny = with_appearance(ModelConfig.from_name("tiny").tiny_twin())
    with pytest.raises(ValueError, match="^video.appearance_from_image: needs an image tower"):
        dataclasses.replace(tiny, image=None)
    with pytest.raises(ValueError, match="^inputs.video_size: must equal inputs.image_size"):
        dataclasses.replace(tiny, inputs=dataclasses.replace(tiny.inputs, video_size=32))


@pytest.mark.parametrize("patch_size,in_channels", [(8, 3), (16, 6), (16, 1)])
def test_conv_stem_gives_the_patch_grid(patch_size, in_channels):
    torch.manual_seed(0)
    tower = TowerConfig(width=32, layers=1, heads=2, patch_size=patch_size, conv_stem=True)
    encoder = PatchEncoder(tower, (64, 64), in_channels=in_channels).eval()
    assert isinstance(encoder.vit.conv1, torch.nn.Sequential)
    out = encoder.encode(torch.randn(B, in_channels, 64, 64))
    assert out.tokens.shape == (B, (64 // patch_size) ** 2, 32) and out.pooled.shape == (B, 32)
    # Convolutions see neighbouring pixels across patch borders: a one-pixel change moves the tokens
    # of the patch it sits in and of the next one (a plain patchify changes one token only).
    x = torch.randn(1, in_channels, 64, 64)
    y = x.clone()
    y[..., patch_size - 1, patch_size - 1] += 5.0  # bottom-right pixel of the first patch
    moved = (encoder.encode(x).tokens - encoder.encode(y).tokens).abs().sum(-1)[0] > 1e-6
    assert moved.sum() >= 2 and moved[0]


@pytest.mark.parametrize("patch_size", [None, 1, 12])
def test_conv_stem_needs_a_power_of_two_patch(patch_size):
    with pytest.raises(ValueError, match="^conv_stem: needs a power-of-two patch_size"):
        TowerConfig(width=32, layers=1, heads=2, patch_size=patch_size, conv_stem=True)
