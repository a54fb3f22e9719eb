"""Registered model sizes: parameters (total and per tower), embedding dimension, inputs per modality, and
forward+backward time per sample on this machine's CPU (all four modalities, InfoNCE over all pairs).

    python benchmarks/model_speed.py [--sizes tiny small base]

Writes benchmarks/results/model_speed.json and model_speed.md. Timings are wall-clock on a shared
machine: treat them as orders of magnitude, not as precise figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.binding import BindingModel  # noqa: E402
from models.config import ModelConfig, available_models  # noqa: E402
from models.losses import ContrastiveLoss  # noqa: E402
from models.spec import MODALITIES  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# (batch, warm-up steps, timed steps) per size: keeps the whole run to a few minutes on 2 cores.
PLAN = {"tiny": (8, 2, 7), "small": (4, 1, 3), "base": (2, 1, 2)}
DEFAULT_PLAN = (2, 1, 1)


def tower_params(model: BindingModel) -> dict[str, int]:
    """Parameters per modality (encoder + head). A video tower that shares the image tower counts only
    its own (temporal) parameters; the shared frame ViT is counted once, under image."""
    seen: set[int] = set()
    counts = {}
    for modality in model.modalities:
        params = list(model.encoders[modality].parameters()) + list(model.heads[modality].parameters())
        counts[modality] = sum(p.numel() for p in params if id(p) not in seen)
        seen.update(id(p) for p in params)
    return counts


def describe_inputs(config: ModelConfig) -> dict[str, str]:
    spec = config.inputs
    return {
        "image": f"3x{spec.image_size}x{spec.image_size}",
        "text": f"{spec.context_length} tokens",
        "audio": f"1x{spec.audio.n_mels}x{spec.audio.num_frames} log-mel ({spec.audio.clip_seconds:g} s)",
        "video": f"{spec.video_frames}x3x{spec.video_size}x{spec.video_size}",
    }


def random_batch(config: ModelConfig, batch: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for m in config.modalities:
        shape = (batch, *config.inputs.shape(m))
        out[m] = (torch.randint(0, config.vocab_size, shape, generator=gen) if m == "text"
                  else torch.randn(shape, generator=gen))
    return out


def time_train_step(model: BindingModel, inputs: dict[str, torch.Tensor], warmup: int, steps: int) -> float:
    """Median seconds per forward+backward step (loss over all pairs), after `warmup` untimed steps.

    The median, because the cores are shared: a neighbour's burst inflates single steps several-fold."""
    loss_fn = ContrastiveLoss()
    model.train()
    durations = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss_fn(model(inputs)).total.backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def measure(name: str) -> dict:
    config = ModelConfig.from_name(name)
    batch, warmup, steps = PLAN.get(name, DEFAULT_PLAN)
    torch.manual_seed(0)
    model = BindingModel(config)
    step = time_train_step(model, random_batch(config, batch), warmup, steps)
    towers = tower_params(model)
    return {
        "name": name, "embed_dim": config.embed_dim, "params_total": sum(p.numel() for p in model.parameters()),
        "params_per_tower": towers, "inputs": describe_inputs(config),
        "video_shares_image_tower": bool(config.video and config.video.share_image_tower),
        "batch": batch, "timed_steps": steps, "step_seconds": round(step, 4),
        "fwd_bwd_ms_per_sample": round(1000 * step / batch, 1),
    }


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Model sizes (`python benchmarks/model_speed.py`)", "",
        f"Measured {report['date']} on {m['nproc']} CPU cores ({m['cpu_model']}), torch {m['torch']}, "
        f"{m['torch_threads']} threads. Forward+backward of all four modalities with InfoNCE over all "
        "pairs, per sample (median step / batch); wall-clock on cores shared with other jobs, so "
        "orders of magnitude only.", "",
        "| size | params | image / text / audio / video(own) | embed dim | inputs (image; text; audio; video) "
        "| fwd+bwd per sample (batch) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["sizes"]:
        t = r["params_per_tower"]
        towers = " / ".join(_millions(t.get(k, 0)) for k in MODALITIES)
        inputs = "; ".join(r["inputs"][k] for k in MODALITIES)
        lines.append(f"| {r['name']} | {_millions(r['params_total'])} | {towers} | {r['embed_dim']} | {inputs} "
                     f"| {r['fwd_bwd_ms_per_sample']:,.1f} ms ({r['batch']}) |")
    lines += ["", "video(own): parameters only the video tower has: its own frame ViT where the config says "
              "`share_image_tower: false` (tiny: 6 input channels, frames + frame differences), else (ImageBind "
              "style, sharing the image ViT) just its temporal layers.", ""]
    return "\n".join(lines)


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=available_models(), choices=available_models())
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    order = {n: i for i, n in enumerate(PLAN)}
    sizes = []
    for name in sorted(args.sizes, key=lambda n: (order.get(n, len(order)), n)):
        result = measure(name)
        print(f"{name}: {result['params_total']:,} params, {result['fwd_bwd_ms_per_sample']} ms/sample", flush=True)
        sizes.append(result)
    report = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "sizes": sizes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "model_speed.md").write_text(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
