"""Data loader throughput on the same ShapesWorld shards, same decode functions, same CPU workers.

    .venv/bin/python benchmarks/data_throughput.py            # ~6-7 minutes on 2 cores

A  raybind reader (pipelines.data.read.reader.read_shards) consumed by the driver through to_torch_batches,
   as a trainer would (Ray cluster with num_cpus=WORKERS: WORKERS decode tasks at a time)
B  webdataset.WebDataset + torch DataLoader(num_workers=WORKERS), the usual open_clip path
C  the decode functions alone: one process per worker, a plain loop over whole tar files
R  reference: ray.data.read_webdataset(decoder=None) + map_batches(same decode) + to_torch_batches
Every path decodes all four modalities with models.decode.decode_sample and the default InputSpec.
Throughput is the best of --rounds runs (the machine may be shared; the load average is recorded);
the ratios are given both from those bests and as the median of each round's own ratios.
Memory: peak RSS summed over the driver and every Ray process (shared object-store pages are
counted in each process that maps them), reading 1x and 4x the shards (4x = the same tars
hard-linked under new names); B's and C's process trees are sampled the same way, so the sampling
thread weighs on every path alike. Results: benchmarks/results/data_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORKERS = 2
BATCH = 64


# ----------------------------------------------------------------------------- shards
def make_shards(root: Path, shards: int, shard_size: int) -> tuple[Path, Path]:
    """ShapesWorld shards (reused when already there) and a 4x copy made of hard links."""
    from pipelines.data.write.synth import SynthConfig, synthesize

    one, four = root / f"x1-{shards}x{shard_size}", root / f"x4-{shards}x{shard_size}"
    manifest = one / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text())["num_samples"] == shards * shard_size):
        synthesize(SynthConfig(out=str(one), samples=shards * shard_size, shard_size=shard_size,
                               seed=0, overwrite=True))
    four.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for copy in range(4):
        for i in range(shards):
            name = f"shard-{copy * shards + i:06d}.tar"
            if not (four / name).exists():
                os.link(one / f"shard-{i:06d}.tar", four / name)
            sizes[name] = shard_size
    (four / "sizes.json").write_text(json.dumps(sizes))
    return one, four


def default_root() -> Path:
    """Where the benchmark shards live unless --data says otherwise: <work folder>/data/bench."""
    from pipelines.core import workspace

    return workspace.subdir("data") / "bench"


def tar_urls(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("shard-*.tar"))


# ----------------------------------------------------------------------------- B and C (children)
def _wds_row(sample: dict):
    from models.decode import decode_sample
    from models.spec import MODALITIES, InputSpec

    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    return decode_sample(members, MODALITIES, InputSpec(), key=sample["__key__"]).sample


def _not_none(row) -> bool:
    return row is not None


def child_b(urls: list[str]) -> dict:
    """webdataset + DataLoader workers (fork after imports, like a training script)."""
    import torch
    import webdataset as wds

    from models.decode import get_tokenizer

    get_tokenizer()
    dataset = wds.WebDataset(urls, shardshuffle=False).shuffle(256).map(_wds_row) \
        .select(_not_none)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=WORKERS)
    start, cpu, n = time.perf_counter(), own_cpu(), 0
    for batch in loader:
        n += len(batch["key"])
    del loader  # joins the workers, so their CPU time is counted
    return {"samples": n, "seconds": time.perf_counter() - start, "cpu_seconds": own_cpu() - cpu}


def _decode_tar(url: str) -> int:
    import tarfile

    from models.decode import decode_sample
    from models.spec import MODALITIES, InputSpec

    spec, n, key, members = InputSpec(), 0, None, {}
    with tarfile.open(url, mode="r|") as tar:
        for info in tar:
            k, ext = info.name.split(".", 1)
            if k != key and members:
                n += decode_sample(members, MODALITIES, spec, key=key).sample is not None
                members = {}
            key, members[ext] = k, tar.extractfile(info).read()
    return n + (decode_sample(members, MODALITIES, spec, key=key).sample is not None if members else 0)


def child_c(urls: list[str]) -> dict:
    """The decode limit: one process per worker, whole tars, no framework, nothing collated."""
    import multiprocessing as mp

    import torch

    from models.decode import get_tokenizer

    torch.set_num_threads(1)  # what DataLoader and Ray workers do too
    get_tokenizer()
    start, cpu = time.perf_counter(), own_cpu()
    pool = mp.get_context("fork").Pool(WORKERS)
    n = sum(pool.map(_decode_tar, urls, chunksize=1))
    pool.close()
    pool.join()  # reaped workers: their CPU time is counted
    return {"samples": n, "seconds": time.perf_counter() - start, "cpu_seconds": own_cpu() - cpu}


def own_cpu() -> float:
    """CPU seconds of this process and its reaped children."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_child(method: str, urls: list[str]) -> dict:
    """B or C in a fresh process; its own CPU count (rusage, reaped workers included), and the peak
    RSS of its process tree."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", method, *urls], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    with MemorySampler(proc.pid) as mem:
        out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"child {method} failed ({proc.returncode}): {err[-2000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": mem.peak / 2**20}


# ----------------------------------------------------------------------------- A and R (Ray)
class MemorySampler:
    """Peak of the summed RSS of a process (default: this one) and all its descendants (Ray's
    processes, DataLoader workers). Every path runs under one, so the sampling thread's own CPU
    (~0.02 cores) weighs on all of them alike."""

    def __init__(self, pid: int | None = None, interval: float = 0.25):
        import psutil

        self.psutil, self.interval, self.peak, self._stop = psutil, interval, 0, threading.Event()
        self.root = psutil.Process(pid)

    def _tree(self) -> list:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except self.psutil.Error:  # the root process has ended
            return []

    def cpu(self) -> float:
        """CPU seconds used so far by the process and its descendants."""
        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except self.psutil.Error:
                pass
        return total

    def total(self) -> int:
        total = 0
        for p in self._tree():
            try:
                total += p.memory_info().rss
            except self.psutil.Error:
                pass
        return total

    def __enter__(self):
        self.baseline, self.cpu_start = self.total(), self.cpu()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.total())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.cpu_seconds = self.cpu() - self.cpu_start  # processes that exited meanwhile are missed


def consume(ds) -> int:
    from pipelines.data.read import to_torch_batches

    return sum(len(b["key"]) for b in to_torch_batches(ds, batch_size=BATCH))


def run_a(folder: Path, config) -> dict:
    from pipelines.data.read import read_shards

    with MemorySampler() as mem:
        start = time.perf_counter()
        n = consume(read_shards(str(folder), config=config))
        seconds = time.perf_counter() - start
    return {"samples": n, "seconds": seconds, "cpu_seconds": mem.cpu_seconds, "peak_rss_mb": mem.peak / 2**20,
            "baseline_rss_mb": mem.baseline / 2**20}


def _rwds_decode(batch: dict) -> dict:
    from models.decode import decode_sample, stack_samples
    from models.spec import MODALITIES, InputSpec

    spec, exts = InputSpec(), [c for c in batch if not c.startswith("__")]
    rows = []
    for i in range(len(batch["__key__"])):
        members = {e: batch[e][i] for e in exts if isinstance(batch[e][i], bytes)}
        row = decode_sample(members, MODALITIES, spec, key=str(batch["__key__"][i])).sample
        if row is not None:
            rows.append(row)
    return stack_samples(rows, MODALITIES, spec)


def run_r(urls: list[str]) -> dict:
    import ray

    ds = ray.data.read_webdataset(urls, decoder=None, override_num_blocks=len(urls))
    ds = ds.map_batches(_rwds_decode, batch_size=BATCH, batch_format="numpy")
    with MemorySampler() as mem:
        start = time.perf_counter()
        n = consume(ds)
        seconds = time.perf_counter() - start
    return {"samples": n, "seconds": seconds, "cpu_seconds": mem.cpu_seconds}


# ----------------------------------------------------------------------------- driver
def machine() -> dict:
    import ray
    import torch
    import webdataset

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**20, 1),
            "python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "webdataset": webdataset.__version__, "platform": platform.platform()}


def rate(result: dict) -> float:
    return result["samples"] / result["seconds"]


def best(runs: list[dict]) -> dict:
    top = max(runs, key=rate)
    cpu_ms = sorted(1000 * r["cpu_seconds"] / r["samples"] for r in runs)
    return {**top, "samples_per_s": round(rate(top), 1), "all_samples_per_s": [round(rate(r), 1) for r in runs],
            "cpu_ms_per_sample_median": round(cpu_ms[len(cpu_ms) // 2], 2)}


def measure(one: Path, four: Path, rounds: int) -> dict:
    """Rounds of C, B, A interleaved (the machine may be shared), then A on 4x the shards, then R
    last (its pandas-heavy workers would otherwise inflate the Ray processes' memory for A)."""
    from pipelines.data.read import ReaderConfig

    config = ReaderConfig()  # defaults, shuffling on, as pretraining reads
    urls = tar_urls(one)
    run_a(one, config)  # warm-up: Ray workers import torch / PyAV / the tokenizer once
    runs: dict[str, list[dict]] = {"A": [], "B": [], "C": []}
    for r in range(rounds):
        # Alternate the order, so a machine that speeds up or slows down during the run (shared
        # hosts here drift by 10-20% within minutes) favours no path.
        for method in ("C", "B", "A") if r % 2 == 0 else ("A", "B", "C"):
            result = run_a(one, config) if method == "A" else run_child(method, urls)
            runs[method].append(result)
            print(f"round {r} {method}: {rate(result):.1f} samples/s ({result['samples']} samples)", flush=True)
    four_x = run_a(four, config)
    print(f"A on 4x shards: {rate(four_x):.1f} samples/s, peak {four_x['peak_rss_mb']:.0f} MiB", flush=True)
    runs["R"] = [run_r(urls)]
    print(f"R: {rate(runs['R'][0]):.1f} samples/s", flush=True)
    one_x_peak = max(r["peak_rss_mb"] for r in runs["A"])
    paired = {pair: [round(rate(x) / rate(y), 3) for x, y in zip(runs[pair[0]], runs[pair[2]], strict=True)]
              for pair in ("A/B", "A/C")}
    return {"runs": {m: best(v) for m, v in runs.items()}, "four_x": four_x, "one_x_peak_rss_mb": one_x_peak,
            "b_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["B"]), "paired": paired}


def summarize(results: dict, args, load_before: tuple) -> dict:
    runs, four_x = results["runs"], results["four_x"]
    a, b, c = (runs[m]["samples_per_s"] for m in "ABC")
    one_x_peak = results["one_x_peak_rss_mb"]  # the highest of the 1x runs: like for like with 4x
    growth = four_x["peak_rss_mb"] / one_x_peak - 1
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "setup": {"shards": args.shards, "shard_size": args.shard_size, "workers": WORKERS, "batch_size": BATCH,
                  "ray_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_num_workers")},
                  "rounds": args.rounds, "modalities": ["image", "text", "audio", "video"],
                  "spec": "models.spec.InputSpec() defaults"},
        "samples_per_s": {"A_raybind_reader": a, "B_webdataset_dataloader": b, "C_decode_only": c,
                          "R_ray_read_webdataset": runs["R"]["samples_per_s"]},
        "runs": runs,
        "ratios": {"A/B": round(a / b, 3), "A/C": round(a / c, 3), "R/B": round(runs["R"]["samples_per_s"] / b, 3)},
        # Each round's own ratio (the runs of a round are seconds apart), and their median: less
        # exposed to the host's drift than the best-of ratios above.
        "paired_ratios": {pair: {"per_round": v, "median": round(statistics.median(v), 3)}
                          for pair, v in results["paired"].items()},
        "memory": {"peak_rss_mb_1x": round(one_x_peak), "peak_rss_mb_4x": round(four_x["peak_rss_mb"]),
                   "growth_4x_vs_1x": round(growth, 3),
                   "peak_rss_mb_B": round(results["b_peak_rss_mb"]),
                   "samples_per_s_4x": round(rate(four_x), 1)},
        "targets": {"A/B >= 1.0 (best of rounds)": a / b >= 1.0,
                    "A/B >= 1.0 (median of per-round ratios)": statistics.median(results["paired"]["A/B"]) >= 1.0,
                    "A/C >= 0.7 (best of rounds)": a / c >= 0.7,
                    "A/C >= 0.7 (median of per-round ratios)": statistics.median(results["paired"]["A/C"]) >= 0.7,
                    "4x peak memory within 15% of 1x": growth <= 0.15},
    }


def write_results(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_throughput.json").write_text(json.dumps(summary, indent=1) + "\n")
    r, m = summary["ratios"], summary["memory"]
    lines = [
        "# Data loader throughput (benchmarks/data_throughput.py)", "",
        f"{summary['date']} on {summary['machine']['cpu']}, {summary['machine']['cores']} cores, "
        f"{summary['machine']['memory_gib']} GiB; Ray {summary['machine']['ray']}, torch "
        f"{summary['machine']['torch']}, webdataset {summary['machine']['webdataset']}. Load average (1, 5, 15 min) "
        f"before the run {summary['load_average_before']}, after {summary['load_average_after']}: the machine "
        "was shared with other jobs, so rounds vary; C, B and A are interleaved in each round and the best "
        "round of each is compared. CPU ms per sample is the CPU time of every process involved (for A: the "
        "driver and all Ray processes) divided by samples: it shows the overhead of each path independent of "
        f"how much of the machine it got. Ray setting: {summary['setup'].get('ray_env', {})}.", "",
        f"{summary['setup']['shards']} ShapesWorld shards x {summary['setup']['shard_size']} samples, all four "
        f"modalities, {summary['setup']['workers']} CPU workers, batch {summary['setup']['batch_size']}, best of "
        f"{summary['setup']['rounds']} rounds.", "",
        "| path | samples/s (best) | CPU ms per sample (median) | all runs, samples/s |", "|---|---:|---:|---|",
    ]
    names = {"A": "A raybind reader -> to_torch_batches", "B": "B webdataset + DataLoader(num_workers=2)",
             "C": "C decode functions only, 2 processes", "R": "R ray.data.read_webdataset + map_batches"}
    for key, name in names.items():
        run = summary["runs"][key]
        lines.append(f"| {name} | {run['samples_per_s']} | {run['cpu_ms_per_sample_median']} | "
                     f"{run['all_samples_per_s']} |")
    p = summary["paired_ratios"]
    lines += ["", f"Best of rounds: A/B = {r['A/B']} (target >= 1.0), A/C = {r['A/C']} (target >= 0.7), "
              f"R/B = {r['R/B']}.", "",
              f"Per round (C, B, A in even rounds, A, B, C in odd ones): A/B {p['A/B']['per_round']}, median "
              f"{p['A/B']['median']}; A/C {p['A/C']['per_round']}, median {p['A/C']['median']}.", "",
              f"Peak RSS (driver + Ray processes): 1x {m['peak_rss_mb_1x']} MiB, 4x {m['peak_rss_mb_4x']} MiB "
              f"({m['growth_4x_vs_1x']:+.1%}; target within 15%); A on 4x: {m['samples_per_s_4x']} samples/s. "
              f"B's process tree (main + DataLoader workers) peaked at {m['peak_rss_mb_B']} MiB. Every path runs "
              "under the same memory sampler (a thread reading /proc every 0.25 s).", "",
              "Targets met: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in summary["targets"].items()),
              ""]
    (out / "data_throughput.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=9)  # the host drifts 10-30% within minutes: many paired rounds
    parser.add_argument("--data", default=None, help="where to write shards (default: <work folder>/data/bench)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        method, urls = args.child[0], args.child[1:]
        print(json.dumps((child_b if method == "B" else child_c)(urls)))
        return 0
    load_before = os.getloadavg()
    # Keep one spare idle worker instead of killing it: at every read-task boundary Ray starts a
    # worker process (~0.7 s of CPU) that becomes surplus a moment later and is killed after 1 s
    # idle (the default soft limit is num_cpus). Recommended for ensure_ray() on small machines.
    os.environ.setdefault("RAY_num_workers_soft_limit", str(WORKERS + 2))
    from pipelines.core.ray_runtime import ensure_ray

    ensure_ray(num_cpus=WORKERS)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    root = Path(args.data) if args.data else default_root()
    one, four = make_shards(root, args.shards, args.shard_size)
    summary = summarize(measure(one, four, args.rounds), args, load_before)
    write_results(summary, Path(args.out))
    print(json.dumps({k: summary[k] for k in ("samples_per_s", "ratios", "memory", "targets")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
