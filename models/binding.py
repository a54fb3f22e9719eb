"""`BindingModel`: four modality encoders bound into one L2-normalised embedding space (ImageBind style).

A batch may hold any subset of the modalities; only those present are encoded, so towers of absent
modalities neither compute nor receive gradients. The learnable temperature is shared by all pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig
from models.spec import MODALITIES

if TYPE_CHECKING:
    from models.encoders import Encoder


@dataclass
class BindingOutput:
    """What `BindingModel.forward` returns (and `ContrastiveLoss` consumes).

    embeddings: modality -> (B, embed_dim), L2-normalised, for each modality given to forward.
    logit_scale: scalar, exp of the learnable log-scale, clamped to the config's max_logit_scale.
    logit_bias: scalar SigLIP bias, or None when the config has no bias.
    masks: modality -> bool (B,) presence masks, as passed to forward (absent key = all present).
    """

    embeddings: dict[str, Tensor]
    logit_scale: Tensor
    logit_bias: Tensor | None = None
    masks: dict[str, Tensor] = field(default_factory=dict)


class ProjectionHead(nn.Module):
    """Tower width -> shared embed_dim. "linear" as CLIP; "mlp" adds a hidden GELU layer."""

    def __init__(self, width: int, embed_dim: int, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(width, embed_dim, bias=False)
            nn.init.normal_(self.net.weight, std=width**-0.5)  # open_clip's projection init
        else:
            self.net = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BindingModel(nn.Module):
    """Encoders + projection heads + a shared temperature (and optional SigLIP bias)."""

    def __init__(self, config: ModelConfig, load_pretrained: bool = True):
        """`load_pretrained=False` skips reading towers' `pretrained` weights (checkpoint loading)."""
        # Deferred: importing open_clip takes seconds; processes that only need BindingOutput or the
        # losses (e.g. distributed loss workers) should not pay for it.
        from models.encoders import build_encoders

        super().__init__()
        self.config = config
        self.encoders: nn.ModuleDict = build_encoders(config, load_pretrained)
        self.heads = nn.ModuleDict({
            m: ProjectionHead(enc.width, config.embed_dim, config.projection) for m, enc in self.encoders.items()
        })
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias))) if config.use_logit_bias else None
        self._locked: set[str] = set()
        for modality in ("image", "text", "audio"):  # LiT towers of the config: frozen, heads still train
            tower = getattr(config, modality)
            if tower is not None and tower.locked:
                self.lock(modality, include_head=False)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.modalities

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def encoder(self, modality: str) -> Encoder:
        self._check_modality(modality)
        return self.encoders[modality]

    # --- encoding --------------------------------------------------------------------------------
    def encode(self, modality: str, x: Tensor, normalize: bool = True) -> Tensor:
        """(B, *input shape) -> (B, embed_dim) in the shared space; L2-normalised unless told not to."""
        self._check_input(modality, x)
        features = self.heads[modality](self.encoders[modality](x))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_tokens(self, modality: str, x: Tensor) -> Tensor:
        """(B, *input shape) -> the encoder's token sequence (B, N, width), for early / middle fusion."""
        self._check_input(modality, x)
        return self.encoders[modality].forward_tokens(x)

    def forward(self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> BindingOutput:
        """Encode every modality in `inputs` (and only those). `masks` are passed through for the loss."""
        embeddings = {m: self.encode(m, inputs[m]) for m in MODALITIES if m in inputs}
        unknown = sorted(set(inputs) - set(embeddings))
        if unknown:
            raise ValueError(f"inputs: unknown modalities {unknown}; this model encodes {list(self.modalities)}")
        scale, bias = self.logit_params()
        return BindingOutput(embeddings=embeddings, logit_scale=scale, logit_bias=bias, masks=dict(masks or {}))

    def logit_params(self) -> tuple[Tensor, Tensor | None]:
        """The applied temperature exp(log_scale), clamped like CLIP (max 100), and the optional bias."""
        scale = torch.clamp(self.logit_scale, max=math.log(self.config.max_logit_scale)).exp()
        return scale, self.logit_bias

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter in place after an optimiser step, as open_clip's training loop does."""
        self.logit_scale.clamp_(0, math.log(self.config.max_logit_scale))

    # --- freezing (LiT) --------------------------------------------------------------------------
    def lock(self, *modalities: str, include_head: bool = True) -> None:
        """Freeze towers (LiT): no gradients, and kept in eval mode even after `model.train()`.

        A video tower that shares the image tower shares its parameters: locking either freezes the
        shared frame ViT.
        """
        for modality in modalities:
            self._check_modality(modality)
            modules = [self.encoders[modality]] + ([self.heads[modality]] if include_head else [])
            for module in modules:
                module.requires_grad_(False)
                module.eval()
            self._locked.add(modality)

    @property
    def locked(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self._locked)

    def train(self, mode: bool = True) -> BindingModel:
        super().train(mode)
        for modality in self._locked:  # frozen towers keep eval-mode behaviour (dropout off, norms fixed)
            self.encoders[modality].eval()
        return self

    # --- checks ----------------------------------------------------------------------------------
    def _check_modality(self, modality: str) -> None:
        if modality not in self.encoders:
            raise ValueError(f"unknown modality {modality!r}; this model encodes {list(self.modalities)}")

    def _check_input(self, modality: str, x: Tensor) -> None:
        self._check_modality(modality)
        expected = self.config.inputs.shape(modality)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"{modality}: expected input shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        if modality == "text" and x.is_floating_point():
            raise ValueError(f"text: expected integer token ids, got {x.dtype}")


def split_batch(batch: Mapping[str, object], modalities: Iterable[str] = MODALITIES
                ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A decoded batch (`image`, `image_mask`, ..., `key`, labels) -> (inputs, masks) for the model.

    Keeps only tensor modalities listed in `modalities`; masks come from `<modality>_mask` keys.
    """
    inputs = {m: batch[m] for m in modalities if isinstance(batch.get(m), Tensor)}
    masks = {m: batch[f"{m}_mask"].bool() for m in inputs if isinstance(batch.get(f"{m}_mask"), Tensor)}
    return inputs, masks
