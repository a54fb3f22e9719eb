"""Fusion modules for downstream tasks: where and how modalities meet.

All take `inputs: modality -> (B, D_m)` pooled features or `(B, N_m, D_m)` token sequences (from
`BindingModel.encode` / `encode_tokens`), optional presence `masks: modality -> bool (B,)`, and return
`(B, out_dim)`. A modality missing from a sample (mask False) never influences that sample's output.

- `LateFusion`: concat pooled features (absent ones zeroed, plus presence flags) -> MLP.
- `AttentionFusion`: a CLS token attends over all modality tokens; absent modalities are key-padded.
- `BottleneckFusion`: MBT (Nagrani et al. 2021) middle fusion; each modality has its own transformer
  stream and modalities exchange information only through a few shared bottleneck tokens per layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from models.spec import MODALITIES


def _ordered(input_dims: Mapping[str, int]) -> list[str]:
    unknown = sorted(set(input_dims) - set(MODALITIES))
    if unknown or not input_dims:
        raise ValueError(f"input_dims: expected modalities from {MODALITIES}, got {sorted(input_dims)}")
    return [m for m in MODALITIES if m in input_dims]


def _presence(names: list[str], inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None) -> Tensor:
    """(B, M) bool: modality m present in sample b (a modality missing from `inputs` is absent)."""
    batch = next(x for x in inputs.values()).shape[0]
    device = next(x for x in inputs.values()).device
    cols = []
    for m in names:
        if m not in inputs:
            cols.append(torch.zeros(batch, dtype=torch.bool, device=device))
        else:
            mask = (masks or {}).get(m)
            cols.append(torch.ones(batch, dtype=torch.bool, device=device) if mask is None else mask.bool())
    return torch.stack(cols, dim=1)


def _tokens(x: Tensor, present: Tensor) -> Tensor:
    """(B, D) or (B, N, D) -> (B, N, D), zeroed where the modality is absent (stray values never leak)."""
    x = x.unsqueeze(1) if x.dim() == 2 else x  # a pooled feature is one token
    return torch.where(present[:, None, None], x, 0.0)


def _block(width: int, heads: int, dropout: float) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=dropout,
                                      activation="gelu", batch_first=True, norm_first=True)


def _masked_mean(x: Tensor, weights: Tensor) -> Tensor:
    """Mean of x (B, M, ...) over modalities with weight 1; `where`, so absent values (even NaN) never leak."""
    keep = weights.bool().view(*weights.shape, *([1] * (x.dim() - 2)))
    total = torch.where(keep, x, 0.0).sum(1)
    count = weights.sum(1).clamp(min=1).view(-1, *([1] * (x.dim() - 2)))
    return total / count


class LateFusion(nn.Module):
    """Late fusion: concatenate pooled features (zeros where absent) and presence flags, then an MLP."""

    def __init__(self, input_dims: Mapping[str, int], out_dim: int, hidden_dim: int = 256, dropout: float = 0.0):
        super().__init__()
        self.names = _ordered(input_dims)
        self.input_dims = {m: input_dims[m] for m in self.names}
        in_dim = sum(self.input_dims.values()) + len(self.names)
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim))

    def forward(self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
        present = _presence(self.names, inputs, masks)
        parts = []
        for i, m in enumerate(self.names):
            if m in inputs:
                x = inputs[m] if inputs[m].dim() == 2 else inputs[m].mean(dim=1)  # tokens -> mean pool
                parts.append(torch.where(present[:, i:i + 1], x, 0.0))
            else:
                parts.append(present.new_zeros(present.shape[0], self.input_dims[m], dtype=torch.float32))
        parts.append(present.float())  # tells the MLP "absent" apart from "a zero feature"
        return self.mlp(torch.cat(parts, dim=1))


class AttentionFusion(nn.Module):
    """A learned CLS token attends over every modality's tokens (projected to `width`, tagged by type)."""

    def __init__(self, input_dims: Mapping[str, int], out_dim: int, width: int = 128, heads: int = 4,
                 layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.names = _ordered(input_dims)
        self.proj = nn.ModuleDict({m: nn.Linear(input_dims[m], width) for m in self.names})
        self.type_embedding = nn.Parameter(torch.randn(len(self.names), width) * 0.02)
        self.cls = nn.Parameter(torch.randn(width) * 0.02)
        self.blocks = nn.ModuleList([_block(width, heads, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
        present = _presence(self.names, inputs, masks)
        batch = present.shape[0]
        seqs, pads = [self.cls.expand(batch, 1, -1)], [present.new_zeros(batch, 1)]
        for i, m in enumerate(self.names):
            if m not in inputs:
                continue
            tokens = self.proj[m](_tokens(inputs[m], present[:, i])) + self.type_embedding[i]
            seqs.append(tokens)
            pads.append((~present[:, i]).unsqueeze(1).expand(-1, tokens.shape[1]))  # True = ignore
        x, pad = torch.cat(seqs, dim=1), torch.cat(pads, dim=1)
        for block in self.blocks:
            x = block(x, src_key_padding_mask=pad)
        return self.head(self.norm(x[:, 0]))


class BottleneckFusion(nn.Module):
    """MBT middle fusion: per-modality streams, cross-modal exchange only via shared bottleneck tokens.

    Each layer, every modality stream attends over [its CLS, its tokens, the bottlenecks]; the new
    bottlenecks are the mean of the streams' bottleneck outputs over the modalities present in each
    sample. The output is the mean of the present streams' CLS tokens (MBT averages per-stream heads).
    """

    def __init__(self, input_dims: Mapping[str, int], out_dim: int, width: int = 128, heads: int = 4,
                 layers: int = 2, num_bottlenecks: int = 4, dropout: float = 0.0):
        super().__init__()
        self.names = _ordered(input_dims)
        self.proj = nn.ModuleDict({m: nn.Linear(input_dims[m], width) for m in self.names})
        self.cls = nn.ParameterDict({m: nn.Parameter(torch.randn(width) * 0.02) for m in self.names})
        self.bottleneck = nn.Parameter(torch.randn(num_bottlenecks, width) * 0.02)
        self.streams = nn.ModuleDict({
            m: nn.ModuleList([_block(width, heads, dropout) for _ in range(layers)]) for m in self.names
        })
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
        present = _presence(self.names, inputs, masks)
        names = [m for m in self.names if m in inputs]
        weights = present[:, [self.names.index(m) for m in names]].float()  # (B, M_in)
        batch = present.shape[0]
        streams = {m: torch.cat([self.cls[m].expand(batch, 1, -1),
                                 self.proj[m](_tokens(inputs[m], present[:, self.names.index(m)]))], dim=1)
                   for m in names}
        shared = self.bottleneck.expand(batch, -1, -1)
        for layer in range(len(self.streams[self.names[0]])):
            streams, shared = self._exchange(layer, streams, shared, weights)
        cls = torch.stack([streams[m][:, 0] for m in names], dim=1)  # (B, M_in, W)
        pooled = _masked_mean(cls, weights)
        return self.head(self.norm(pooled))

    def _exchange(self, layer: int, streams: dict[str, Tensor], shared: Tensor, weights: Tensor
                  ) -> tuple[dict[str, Tensor], Tensor]:
        """One MBT layer: each stream sees the shared bottlenecks; they are then averaged back."""
        n = shared.shape[1]
        out, updates = {}, []
        for m, x in streams.items():
            y = self.streams[m][layer](torch.cat([x, shared], dim=1))
            out[m], update = y[:, :-n], y[:, -n:]
            updates.append(update)
        averaged = _masked_mean(torch.stack(updates, dim=1), weights)  # (B, n, W)
        # A sample with no modality present keeps its previous bottlenecks.
        return out, torch.where(weights.sum(1)[:, None, None] > 0, averaged, shared)
