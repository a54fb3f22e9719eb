"""ContrastiveLoss: against a direct python-loop computation (masks included), edge cases, and the
distributed version (gloo, 2 processes) against the single-process loss on the concatenated batch."""

from __future__ import annotations

import math
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models.binding import BindingOutput
from models.losses import ContrastiveLoss, LossOutput, modality_pairs, pair_name

D = 8
MASKS = {  # image-text: 5 valid, image-audio: 3, text-audio: 2, pairs with video: 1 (skipped)
    "image": [1, 1, 1, 1, 1, 0, 1, 1],
    "text": [1, 1, 0, 1, 1, 1, 1, 0],
    "audio": [0, 1, 0, 0, 0, 0, 1, 1],
    "video": [0, 0, 0, 0, 0, 1, 0, 1],
}


def make_output(n: int = 8, seed: int = 0, modalities=("image", "text", "audio", "video"),
                bias: float | None = None) -> BindingOutput:
    gen = torch.Generator().manual_seed(seed)
    emb = {m: F.normalize(torch.randn(n, D, generator=gen, dtype=torch.float64), dim=-1) for m in modalities}
    masks = {m: torch.tensor(MASKS[m][:n], dtype=torch.bool) for m in modalities}
    return BindingOutput(embeddings=emb, logit_scale=torch.tensor(3.0, dtype=torch.float64),
                         logit_bias=None if bias is None else torch.tensor(bias, dtype=torch.float64), masks=masks)


def dot(u, v) -> float:
    return sum(float(a) * float(b) for a, b in zip(u, v, strict=True))


def loop_infonce(a, b, valid, scale) -> float:
    """Symmetric InfoNCE written out sample by sample."""
    idx = [i for i in range(len(valid)) if valid[i]]
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in idx:
            logits = {j: scale * dot(x[i], y[j]) for j in idx}
            total += -(logits[i] - math.log(sum(math.exp(v) for v in logits.values())))
    return total / (2 * len(idx))


def loop_siglip(a, b, valid, scale, bias) -> float:
    idx = [i for i in range(len(valid)) if valid[i]]
    total = 0.0
    for i in idx:
        for j in idx:
            z = scale * dot(a[i], b[j]) + bias
            label = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-label * z))  # -log sigmoid(label * z)
    return total / len(idx)


def loop_reference(output: BindingOutput, kind: str, anchor: str, weights: dict[str, float]) -> dict:
    mods = list(output.embeddings)
    terms, wsum = {}, {}
    for x in range(len(mods)):
        for y in range(x + 1, len(mods)):
            a, b = mods[x], mods[y]
            if anchor != "all" and anchor not in (a, b):
                continue
            valid = [bool(p and q) for p, q in zip(output.masks[a], output.masks[b], strict=True)]
            name = f"{a}-{b}"
            if sum(valid) < 2 or weights.get(name, 1.0) == 0:
                continue
            ea, eb, s = output.embeddings[a], output.embeddings[b], float(output.logit_scale)
            terms[name] = (loop_infonce(ea, eb, valid, s) if kind == "infonce"
                           else loop_siglip(ea, eb, valid, s, float(output.logit_bias)))
            wsum[name] = weights.get(name, 1.0)
    total = sum(wsum[n] * terms[n] for n in terms) / sum(wsum.values())
    return {"total": total, **terms}


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
@pytest.mark.parametrize("anchor, weights", [
    ("all", {}), ("image", {}), ("text", {"image-text": 2.0, "text-audio": 0.5}), ("all", {"image-text": 0.0}),
])
def test_matches_python_loop_reference(kind, anchor, weights):
    output = make_output(bias=-1.5 if kind == "siglip" else None)
    loss = ContrastiveLoss(kind, anchor, weights)(output)
    ref = loop_reference(output, kind, anchor, weights)
    assert isinstance(loss, LossOutput)
    assert set(loss.per_pair) == set(ref) - {"total"}
    for name, value in loss.per_pair.items():
        assert value.item() == pytest.approx(ref[name], rel=1e-9), name
    assert loss.total.item() == pytest.approx(ref["total"], rel=1e-9)


def test_pair_counts_and_skipped_pairs():
    loss = ContrastiveLoss()(make_output())
    assert loss.pair_counts == {"image-text": 5, "image-audio": 3, "image-video": 1,
                                "text-audio": 2, "text-video": 1, "audio-video": 1}
    assert set(loss.per_pair) == {"image-text", "image-audio", "text-audio"}
    assert all(torch.isfinite(v) for v in loss.per_pair.values())


def test_no_valid_pair_gives_zero_with_a_graph():
    output = make_output(n=3, modalities=("image", "video"))  # image-video: no sample has both
    for e in output.embeddings.values():
        e.requires_grad_(True)
    loss = ContrastiveLoss()(output)
    assert loss.per_pair == {} and loss.total.item() == 0.0
    loss.total.backward()
    assert output.embeddings["image"].grad is not None and not output.embeddings["image"].grad.any()


def test_single_modality_and_missing_masks_mean_present():
    output = make_output(modalities=("image",))
    assert ContrastiveLoss()(output).total.item() == 0.0
    output = make_output(modalities=("image", "text"))
    full = ContrastiveLoss()(output, masks={})  # explicit empty masks: everything present
    ref = loop_infonce(output.embeddings["image"], output.embeddings["text"], [True] * 8, 3.0)
    assert full.total.item() == pytest.approx(ref, rel=1e-9)
    assert full.pair_counts == {"image-text": 8}


def test_masked_samples_do_not_influence_the_loss():
    output = make_output(modalities=("image", "text"))
    before = ContrastiveLoss()(output).total
    output.embeddings["image"][5] = 123.0  # image absent for sample 5
    output.embeddings["text"][2] = float("nan")  # text absent for sample 2
    assert ContrastiveLoss()(output).total.item() == pytest.approx(before.item(), rel=1e-12)


def test_pair_names_and_anchor_modes():
    assert pair_name("video", "image") == "image-video" and pair_name("text", "audio") == "text-audio"
    mods = ["video", "text", "image", "audio"]
    assert len(modality_pairs(mods)) == 6
    assert modality_pairs(mods, "image") == [("image", "text"), ("image", "audio"), ("image", "video")]
    assert modality_pairs(mods, "text") == [("image", "text"), ("text", "audio"), ("text", "video")]


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="kind"):
        ContrastiveLoss(kind="triplet")
    with pytest.raises(ValueError, match="anchor"):
        ContrastiveLoss(anchor="depth")
    with pytest.raises(ValueError, match="pair_weights.text-image: unknown pair"):
        ContrastiveLoss(pair_weights={"text-image": 1.0})
    with pytest.raises(ValueError, match="pair_weights.image-text"):
        ContrastiveLoss(pair_weights={"image-text": -1.0})


# --- distributed ---------------------------------------------------------------------------------
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(n: int = 12) -> dict[str, torch.Tensor]:
    """Masks chosen so the ranks hold different numbers of valid samples per pair (rank 0 has no
    valid image-video sample at all) and audio-video has a single valid sample (skipped)."""
    gen = torch.Generator().manual_seed(1)
    masks = {
        "image": [1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1],
        "text": [1, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1],
        "audio": [1, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 1],
        "video": [0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0],
    }
    data = {m: torch.randn(n, D, generator=gen) for m in masks}
    data.update({f"{m}_mask": torch.tensor(v, dtype=torch.uint8) for m, v in masks.items()})
    data["log_scale"] = torch.tensor(math.log(5.0))
    return data


def _single_process(data: dict[str, torch.Tensor], kind: str, anchor: str) -> dict[str, torch.Tensor]:
    names = [k for k in data if not k.endswith("_mask") and k != "log_scale"]
    feats = {m: data[m].clone().requires_grad_(True) for m in names}
    log_scale = data["log_scale"].clone().requires_grad_(True)
    output = BindingOutput(embeddings={m: F.normalize(f, dim=-1) for m, f in feats.items()},
                           logit_scale=log_scale.exp(), logit_bias=log_scale * 0 - 2.0 if kind == "siglip" else None,
                           masks={m: data[f"{m}_mask"].bool() for m in names})
    loss = ContrastiveLoss(kind, anchor)(output)
    loss.total.backward()
    out = {"total": loss.total.detach(), "grad.log_scale": log_scale.grad}
    out.update({f"pair.{p}": v.detach() for p, v in loss.per_pair.items()})
    out.update({f"grad.{m}": f.grad for m, f in feats.items()})
    return out


def _spawn_ranks(tmp_path: Path, data: dict[str, torch.Tensor], anchor: str) -> list[dict[str, torch.Tensor]]:
    sys.path.insert(0, str(Path(__file__).parent))  # spawned children import the worker by module name
    import model_helpers

    payload = tmp_path / "payload.safetensors"
    save_file(data, str(payload))
    ctx = mp.start_processes(model_helpers.loss_worker, args=(WORLD, _free_port(), str(payload), str(tmp_path), anchor),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed loss workers did not finish in 120 s")
    return [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]


def test_distributed_loss_equals_single_process_on_concatenated_batch(tmp_path):
    anchor = "all"
    data = _global_batch()
    ranks = _spawn_ranks(tmp_path, data, anchor)
    for kind in ("infonce", "siglip"):
        single = _single_process(data, kind, anchor)
        assert {k for k in single if k.startswith("pair.")} == {"pair.image-text", "pair.image-audio",
                                                               "pair.image-video", "pair.text-audio",
                                                               "pair.text-video"}
        # Values: each rank's term is scaled so that the MEAN over ranks is the global loss.
        for key in [k for k in single if k == "total" or k.startswith("pair.")]:
            mean = sum(r[f"{kind}.{key}"] for r in ranks) / WORLD
            torch.testing.assert_close(mean, single[key], rtol=1e-5, atol=1e-6, msg=f"{kind} {key}")
        # Gradients w.r.t. each rank's inputs: the gather's backward sums over ranks, so after DDP's
        # averaging (divide by world size) they equal the single-process gradients of that slice.
        for m in ("image", "text", "audio", "video"):
            got = torch.cat([r[f"{kind}.grad.{m}"] for r in ranks]) / WORLD
            torch.testing.assert_close(got, single[f"grad.{m}"], rtol=1e-4, atol=1e-6, msg=f"{kind} grad {m}")
            assert got.abs().sum() > 0
        scale_grad = sum(r[f"{kind}.grad.log_scale"] for r in ranks) / WORLD  # a replicated parameter
        torch.testing.assert_close(scale_grad, single["grad.log_scale"], rtol=1e-4, atol=1e-6)
