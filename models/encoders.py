"""One encoder per modality: decoded input -> token sequence (B, N, W) and pooled feature (B, W).

Image and text are open_clip's own towers (`VisionTransformer`, `TextTransformer`) with their output
projections removed: the shared-space projection heads live in `BindingModel`, one per modality.
Audio is a ViT over log-mel patches (AST / ImageBind style) built from the same open_clip class with
a 1-channel, non-square patch grid. Video runs frames through a ViT (its own, or the image tower
itself), adds learned temporal position embeddings and mixes frames with a small transformer.

Every encoder exposes `encode(x) -> EncoderOutput`, `forward_tokens(x)` and `forward(x)` (pooled), so
late fusion can use pooled features and early / middle fusion the token sequences.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from open_clip.transformer import LayerNorm, TextTransformer, Transformer, VisionTransformer
from torch import Tensor, nn

from models.config import ModelConfig, TowerConfig, VideoTowerConfig


class EncoderOutput(NamedTuple):
    tokens: Tensor  # (B, N, width) after the final norm: patch tokens (no CLS), text tokens, or one per frame
    pooled: Tensor  # (B, width): the summary the projection head maps to the shared space


class Encoder(nn.Module):
    """Common interface; subclasses implement `encode`."""

    width: int

    def encode(self, x: Tensor) -> EncoderOutput:
        raise NotImplementedError

    def forward_tokens(self, x: Tensor) -> Tensor:
        return self.encode(x).tokens

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x).pooled


class PatchEncoder(Encoder):
    """A ViT over an image-like input: open_clip's VisionTransformer, CLS-token pooling, no projection.

    `size` may be non-square (audio: mels x frames); `in_channels` 1 for spectrograms, 3 for RGB.
    """

    def __init__(self, tower: TowerConfig, size: tuple[int, int], in_channels: int = 3):
        super().__init__()
        self.width = tower.width
        self.vit = VisionTransformer(
            image_size=size, patch_size=tower.patch_size, width=tower.width, layers=tower.layers,
            heads=tower.heads, mlp_ratio=tower.mlp_ratio, ls_init_value=tower.ls_init_value,
            output_dim=tower.width, output_tokens=True,
        )
        # The shared-space head lives in BindingModel; drop open_clip's own projection.
        self.vit.proj = None
        if tower.conv_stem:
            self.vit.conv1 = conv_stem(in_channels, tower.width, tower.patch_size)
        elif in_channels != 3:
            # open_clip hard-codes RGB; a spectrogram is one channel (AST / ImageBind audio).
            self.vit.conv1 = nn.Conv2d(in_channels, tower.width, kernel_size=tower.patch_size,
                                       stride=tower.patch_size, bias=False)

    def encode(self, x: Tensor) -> EncoderOutput:
        pooled, tokens = self.vit(x)
        return EncoderOutput(tokens=tokens, pooled=pooled)


STEM_MIN_CHANNELS = 8


def conv_stem(in_channels: int, width: int, patch_size: int) -> nn.Sequential:
    """log2(patch_size) stride-2 3x3 conv + BatchNorm + ReLU stages, channels doubling up to width/2,
    then a 1x1 conv to width: the same (B, width, H/p, W/p) grid as the patchify it replaces."""
    stages, channels = [], in_channels
    n = patch_size.bit_length() - 1
    for i in range(n):
        out = max(width // 2 ** (n - i), STEM_MIN_CHANNELS)
        # BatchNorm, as in the paper. GroupNorm normalises each image on its own and so strips its
        # absolute colour: a 100-step image-text run then found the caption's colour in 0.50-0.95
        # of its top-5 images, against 1.00 with BatchNorm or without a stem. Locked towers stay in
        # eval mode (running statistics fixed); DDP broadcasts the buffers from rank 0.
        stages += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                   nn.ReLU(inplace=True)]
        channels = out
    return nn.Sequential(*stages, nn.Conv2d(channels, width, 1))


class TextEncoder(Encoder):
    """open_clip's causal text transformer; pooled at the end-of-text token (the largest token id)."""

    def __init__(self, tower: TowerConfig, context_length: int, vocab_size: int):
        super().__init__()
        self.width = tower.width
        self.transformer = TextTransformer(
            context_length=context_length, vocab_size=vocab_size, width=tower.width,
            heads=tower.heads, layers=tower.layers, mlp_ratio=tower.mlp_ratio,
            ls_init_value=tower.ls_init_value, output_dim=None, output_tokens=True,
        )

    def encode(self, x: Tensor) -> EncoderOutput:
        pooled, tokens = self.transformer(x)
        return EncoderOutput(tokens=tokens, pooled=pooled)


class HFTextEncoder(Encoder):
    """A pretrained Hugging Face transformers text model (local folder, models/pretrained.py): token
    ids padded with its pad id -> last hidden states, pooled the sentence-transformers way."""

    def __init__(self, tower: TowerConfig, context_length: int, load_weights: bool = True):
        from models.pretrained import build_hf_model, check_hf_shape, normalizes, pooling_mode

        super().__init__()
        self.model = build_hf_model(tower.pretrained, load_weights)
        check_hf_shape(tower, self.model.config, context_length)
        self.width = tower.width
        self.pad_id = int(self.model.config.pad_token_id or 0)
        self.pooling = pooling_mode(tower.pretrained)
        self.normalize = normalizes(tower.pretrained)

    def encode(self, x: Tensor) -> EncoderOutput:
        from models.pretrained import pool

        mask = x != self.pad_id
        tokens = self.model(input_ids=x, attention_mask=mask.long()).last_hidden_state
        return EncoderOutput(tokens=tokens, pooled=pool(tokens, mask, self.pooling, self.normalize))


class VideoEncoder(Encoder):
    """Frames through a per-frame ViT, then learned temporal positions, a temporal transformer, mean pool.

    Tokens are one per frame (B, T, W): compact enough for fusion modules. When `frame_encoder` is
    the image tower's module, weights are shared (ImageBind) and gradients from video reach it.
    With an `image_encoder` (the appearance pathway), the middle frame's image-tower embedding,
    projected, leads the frame tokens as one more token (B, 1 + T, W).
    """

    def __init__(self, config: VideoTowerConfig, num_frames: int, frame_encoder: PatchEncoder,
                 frame_tower: TowerConfig, image_encoder: PatchEncoder | None = None):
        super().__init__()
        self.frame_encoder = frame_encoder
        # The appearance pathway: the image tower itself (shared weights) on the middle frame.
        self.image_encoder = image_encoder
        self.appearance = None if image_encoder is None else nn.Linear(image_encoder.width, frame_encoder.width)
        self.motion = config.motion
        self.width = width = frame_encoder.width
        self.temporal_embedding = nn.Parameter(torch.randn(num_frames, width) * 0.02)
        self.temporal = None
        if config.temporal_layers > 0:
            self.temporal = Transformer(width, config.temporal_layers, frame_tower.heads,
                                        mlp_ratio=frame_tower.mlp_ratio, ls_init_value=frame_tower.ls_init_value)
        self.ln = LayerNorm(width)

    def encode(self, x: Tensor) -> EncoderOutput:
        batch, frames = x.shape[:2]
        if self.motion:
            x = torch.cat([x, motion_channels(x)], dim=2)
        per_frame = self.frame_encoder(x.flatten(0, 1))  # (B*T, W)
        tokens = per_frame.view(batch, frames, -1) + self.temporal_embedding[:frames]
        if self.image_encoder is not None:  # the raw RGB middle frame (the first 3 channels)
            # A token of its own rather than added to every frame token: added, it dominated the
            # frame tokens and direction was learned later (probe, 400 steps: 0.89 added, 1.00 as a token).
            middle = self.appearance(self.image_encoder(x[:, frames // 2, :3]))
            tokens = torch.cat([middle[:, None], tokens], dim=1)
        if self.temporal is not None:
            tokens = self.temporal(tokens)
        tokens = self.ln(tokens)
        return EncoderOutput(tokens=tokens, pooled=tokens.mean(dim=1))


def motion_channels(x: Tensor) -> Tensor:
    """(B, T, C, H, W) -> each frame's difference to the next (the last frame repeats the previous
    difference; a single frame has none)."""
    if x.shape[1] < 2:
        return torch.zeros_like(x)
    diff = x[:, 1:] - x[:, :-1]
    return torch.cat([diff, diff[:, -1:]], dim=1)


def build_encoders(config: ModelConfig, load_pretrained: bool = True) -> nn.ModuleDict:
    """One encoder per modality of `config`; video may reuse the image encoder module (shared weights).

    Towers whose config names `pretrained` weights start from them when `load_pretrained` (a checkpoint
    loader passes False: its own weights replace them; hf towers then build from their config only).
    """
    spec = config.inputs
    encoders = nn.ModuleDict()
    if config.image is not None:
        encoders["image"] = PatchEncoder(config.image, (spec.image_size, spec.image_size))
    if config.text is not None and config.text.kind == "hf":
        encoders["text"] = HFTextEncoder(config.text, spec.context_length, load_weights=load_pretrained)
    elif config.text is not None:
        encoders["text"] = TextEncoder(config.text, spec.context_length, config.vocab_size)
    if config.audio is not None:
        size = (spec.audio.n_mels, spec.audio.num_frames)
        encoders["audio"] = PatchEncoder(config.audio, size, in_channels=1)
    if config.video is not None:
        if config.video.share_image_tower:
            frame_tower, frame_encoder = config.image, encoders["image"]
        else:
            frame_tower = config.video.frame
            frame_encoder = PatchEncoder(frame_tower, (spec.video_size, spec.video_size),
                                         in_channels=6 if config.video.motion else 3)
        image_encoder = encoders["image"] if config.video.appearance_from_image else None
        encoders["video"] = VideoEncoder(config.video, spec.video_frames, frame_encoder, frame_tower, image_encoder)
    if load_pretrained:
        from models.pretrained import init_towers

        init_towers(encoders, config)
    return encoders
