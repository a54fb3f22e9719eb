"""Contrastive losses over every modality pair present in a batch, with presence masks.

For a pair (a, b) only samples holding both modalities take part (mask_a AND mask_b); a pair with
fewer than two such samples (in the whole, possibly distributed, batch) contributes nothing.

kind="infonce": CLIP's symmetric InfoNCE, mean over valid samples of the a->b and b->a cross entropies.
kind="siglip":  SigLIP's sigmoid loss over all valid (i, j) pairs, summed and divided by the count.

Distributed (world_size > 1, a process group already initialised by the caller): embeddings are
all-gathered WITH gradients and masks without, and each rank computes the loss of its local rows
against all global columns, as open_clip's ClipLoss with local_loss=True and gather_with_grad=True
(labels offset by rank * B). Each rank's value is scaled so that its MEAN over ranks equals the loss
of the concatenated batch; since the gather's backward sums gradients over ranks, DDP's gradient
averaging then yields exactly the single-process gradients. Every rank must have the same local
batch size (all_gather needs equal shapes: use drop_last).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import _functional_collectives as funcol

from models.spec import MODALITIES

if TYPE_CHECKING:  # only attributes are read: any object with BindingOutput's fields works
    from models.binding import BindingOutput

KINDS = ("infonce", "siglip")
ANCHORS = ("all",) + MODALITIES


@dataclass
class LossOutput:
    """total: weighted mean of the contributing pair terms (a scalar with a graph, also when none do).
    per_pair: "a-b" -> the pair's term, for each contributing pair (canonical names, e.g. "image-text").
    pair_counts: "a-b" -> samples holding both modalities in the whole batch, for every pair considered.

    With world_size > 1, `total` and `per_pair` are this rank's share (their mean over ranks is the
    loss of the global batch): all-reduce-average them before logging a global figure.
    """

    total: Tensor
    per_pair: dict[str, Tensor]
    pair_counts: dict[str, int]


def pair_name(a: str, b: str) -> str:
    """Canonical pair name: modalities in MODALITIES order ("text", "image" -> "image-text")."""
    first, second = sorted((a, b), key=MODALITIES.index)
    return f"{first}-{second}"


def modality_pairs(modalities: list[str] | tuple[str, ...], anchor: str = "all") -> list[tuple[str, str]]:
    """Pairs to train, in canonical order: all pairs, or only those containing the `anchor` modality."""
    ordered = [m for m in MODALITIES if m in modalities]
    pairs = list(itertools.combinations(ordered, 2))
    return pairs if anchor == "all" else [p for p in pairs if anchor in p]


class ContrastiveLoss(nn.Module):
    """Binding loss: `loss(output, masks=None, rank=0, world_size=1) -> LossOutput`.

    anchor: "all" pairs, or an anchor modality ("image" as ImageBind, "text" as LanguageBind).
    pair_weights: "a-b" -> weight (default 1.0; 0 skips the pair).
    """

    def __init__(self, kind: str = "infonce", anchor: str = "all", pair_weights: Mapping[str, float] | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
        if anchor not in ANCHORS:
            raise ValueError(f"anchor: must be one of {ANCHORS}, got {anchor!r}")
        self.kind, self.anchor = kind, anchor
        self.pair_weights = _check_weights(pair_weights or {})

    def forward(self, output: BindingOutput, masks: Mapping[str, Tensor] | None = None,
                rank: int = 0, world_size: int = 1) -> LossOutput:
        local = output.embeddings
        masks = _resolve_masks(local, output.masks if masks is None else masks)
        if world_size > 1 and dist.get_rank() != rank:
            raise ValueError(f"rank {rank} does not match the process group's rank {dist.get_rank()}")
        glob, glob_masks = (local, masks) if world_size == 1 else _gather(local, masks, world_size)
        batch = next(iter(local.values())).shape[0] if local else 0
        terms, weights, counts = {}, {}, {}
        for a, b in modality_pairs(list(local), self.anchor):
            name = pair_name(a, b)
            weight = self.pair_weights.get(name, 1.0)
            valid, valid_glob = masks[a] & masks[b], glob_masks[a] & glob_masks[b]
            counts[name] = int(valid_glob.sum())
            if weight == 0 or counts[name] < 2:
                continue
            # Labels: the position of each local valid sample among the global valid columns.
            labels = (valid_glob.cumsum(0) - 1)[rank * batch:(rank + 1) * batch][valid]
            local_sum = self._pair_sum(local[a][valid], local[b][valid], glob[a][valid_glob],
                                       glob[b][valid_glob], labels, output)
            terms[name] = local_sum * world_size / counts[name]
            weights[name] = weight
        return LossOutput(total=_weighted_total(terms, weights, output), per_pair=terms, pair_counts=counts)

    def _pair_sum(self, rows_a: Tensor, rows_b: Tensor, cols_a: Tensor, cols_b: Tensor,
                  labels: Tensor, output: BindingOutput) -> Tensor:
        """Loss summed over this rank's valid rows (not yet divided by the global count)."""
        scale = output.logit_scale
        logits_ab = scale * _upcast(rows_a) @ _upcast(cols_b).T  # local a vs global b
        if self.kind == "siglip":
            return _siglip_sum(logits_ab, labels, output.logit_bias)
        logits_ba = scale * _upcast(rows_b) @ _upcast(cols_a).T  # local b vs global a
        ce_ab = F.cross_entropy(logits_ab, labels, reduction="sum")
        ce_ba = F.cross_entropy(logits_ba, labels, reduction="sum")
        return (ce_ab + ce_ba) / 2


def _upcast(x: Tensor) -> Tensor:
    """Logits in at least float32: bf16 / fp16 embeddings lose too much in exp / log-sum-exp."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _siglip_sum(logits: Tensor, labels: Tensor, bias: Tensor | None) -> Tensor:
    if bias is not None:
        logits = logits + bias
    signs = -torch.ones_like(logits)
    signs[torch.arange(len(labels), device=logits.device), labels] = 1.0
    return -F.logsigmoid(signs * logits).sum()


def _weighted_total(terms: dict[str, Tensor], weights: dict[str, float], output: BindingOutput) -> Tensor:
    if not terms:
        # Nothing to contrast: a zero that still has a graph, so `total.backward()` works everywhere.
        return sum((e.sum() * 0.0 for e in output.embeddings.values()), output.logit_scale * 0.0)
    return sum(weights[n] * terms[n] for n in terms) / sum(weights.values())


def _resolve_masks(embeddings: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Boolean (B,) mask per embedded modality; a modality without a mask counts as present everywhere."""
    out = {}
    for m, e in embeddings.items():
        mask = masks.get(m)
        out[m] = torch.ones(e.shape[0], dtype=torch.bool, device=e.device) if mask is None else mask.bool()
        if out[m].shape != (e.shape[0],):
            raise ValueError(f"masks.{m}: expected shape ({e.shape[0]},), got {tuple(out[m].shape)}")
    return out


def _gather(embeddings: dict[str, Tensor], masks: dict[str, Tensor], world_size: int
            ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """All ranks' embeddings (with gradients, one collective) and masks (without), in rank order."""
    names = list(embeddings)
    group = dist.group.WORLD
    flat = torch.cat([embeddings[m] for m in names], dim=1)  # (B, M * D): one gather for all modalities
    # Differentiable all-gather (torch's replacement for torch.distributed.nn.all_gather): its backward
    # reduce-scatters, i.e. sums every rank's gradient for these rows back onto the owning rank.
    all_flat = funcol.all_gather_single(flat, 0, group)
    stacked = torch.stack([masks[m] for m in names], dim=1).to(torch.uint8)  # gloo has no bool gather
    all_masks = funcol.all_gather_single(stacked, 0, group).bool()
    if all_masks.shape[0] != world_size * stacked.shape[0]:
        raise ValueError(f"world_size {world_size} does not match the process group ({dist.get_world_size()})")
    chunks = all_flat.split([embeddings[m].shape[1] for m in names], dim=1)
    return dict(zip(names, chunks, strict=True)), {m: all_masks[:, i] for i, m in enumerate(names)}


def _check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    valid = {pair_name(a, b) for a, b in itertools.combinations(MODALITIES, 2)}
    for name, weight in weights.items():
        if name not in valid:
            raise ValueError(f"pair_weights.{name}: unknown pair; expected one of {sorted(valid)}")
        if not weight >= 0:
            raise ValueError(f"pair_weights.{name}: must be >= 0, got {weight!r}")
    return dict(weights)
