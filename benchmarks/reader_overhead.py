"""The data path's own cost, with decoding taken out: every "decode" is a copy of one decoded sample.

    .venv/bin/python benchmarks/reader_overhead.py            # ~1-2 minutes on 2 cores

What is left is what each loader adds around the decode functions: for the raybind reader, building
Arrow blocks, the object store, Ray Data's executor and `to_torch_batches`; for webdataset's usual
path, DataLoader's worker queues and collation. Both move the same rows (the default InputSpec, all
four modalities, ~545 kB each) with 2 CPU workers in batches of 64. The reader runs with several
block sizes, to show what a block that is not a multiple of the batch costs (a batch that straddles
two blocks is concatenated; one inside a block is a zero-copy slice).
Results: benchmarks/results/reader_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import data_throughput as dt  # noqa: E402  (shards, CPU accounting and the Ray setting it uses)

TASKS, ROWS_PER_TASK = 8, 250


def template() -> dict:
    """One real decoded sample (the first of the benchmark's shards)."""
    import tarfile

    from models.decode import decode_sample
    from models.spec import MODALITIES, InputSpec

    one, _ = dt.make_shards(dt.default_root(), 8, 250)
    key, members = None, {}
    with tarfile.open(dt.tar_urls(one)[0]) as tar:
        for info in tar:
            k, ext = info.name.split(".", 1)
            if members and k != key:
                break
            key, members[ext] = k, tar.extractfile(info).read()
    return decode_sample(members, MODALITIES, InputSpec(), key=key).sample


def copy_of(sample: dict) -> dict:
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in sample.items()}


def copy_into(sample: dict, slots: dict[str, np.ndarray]) -> dict:
    """The reader's "decode" here: the sample's arrays written into its block's row (BlockBuilder)."""
    for modality, slot in slots.items():
        slot[...] = sample[modality]
    return {**sample, **slots}


def run_dataloader() -> dict:
    import torch

    sample = template()

    class Copies(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            for _ in range(info.id, TASKS, info.num_workers):
                for _ in range(ROWS_PER_TASK):
                    yield copy_of(sample)

    start, cpu, n = time.perf_counter(), dt.own_cpu(), 0
    loader = torch.utils.data.DataLoader(Copies(), batch_size=dt.BATCH, num_workers=dt.WORKERS)
    for batch in loader:
        n += len(batch["key"])
    del loader
    return {"samples": n, "seconds": time.perf_counter() - start, "cpu_seconds": dt.own_cpu() - cpu}


def run_reader(sample: dict, rows_per_block: int) -> dict:
    """The reader's block path (BlockBuilder, Ray Data, to_torch_batches) over copies of `sample`."""
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    from models.spec import InputSpec
    from pipelines.data.read import ReaderConfig, configure_context, to_torch_batches
    from pipelines.data.read.datasource import BlockBuilder

    cfg, spec = ReaderConfig(), InputSpec()

    def read():
        block = BlockBuilder(rows_per_block, cfg, spec)
        for _ in range(ROWS_PER_TASK):
            block.add(copy_into(sample, block.slots()))
            if len(block) == rows_per_block:
                yield block.build()
                block = BlockBuilder(rows_per_block, cfg, spec)
        if len(block):
            yield block.build()

    class Copies(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(read, meta) for _ in range(TASKS)]

    ds = ray.data.read_datasource(Copies(), override_num_blocks=TASKS)
    configure_context(ds.context, dataclasses.replace(cfg, samples_per_block=rows_per_block), spec)
    with dt.MemorySampler() as mem:
        start = time.perf_counter()
        n = sum(len(b["key"]) for b in to_torch_batches(ds, batch_size=dt.BATCH))
        seconds = time.perf_counter() - start
    return {"samples": n, "seconds": seconds, "cpu_seconds": mem.cpu_seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block-rows", default="123,128,256", help="reader block sizes to compare")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_dataloader()))
        return 0
    os.environ.setdefault("RAY_num_workers_soft_limit", str(dt.WORKERS + 2))
    from pipelines.core.ray_runtime import ensure_ray

    ensure_ray(num_cpus=dt.WORKERS)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    sample, sizes = template(), [int(x) for x in args.block_rows.split(",")]
    run_reader(sample, sizes[0])  # warm-up: the read workers start
    runs: dict[str, list[dict]] = {"dataloader": [], **{f"reader_{r}_rows": [] for r in sizes}}
    for r in range(args.rounds):
        out = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, check=True)
        runs["dataloader"].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for rows in sizes if r % 2 == 0 else sizes[::-1]:
            runs[f"reader_{rows}_rows"].append(run_reader(sample, rows))
        print(f"round {r}: " + ", ".join(f"{k} {dt.rate(v[-1]):.0f}/s" for k, v in runs.items()), flush=True)
    summary = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": dt.machine(),
               "setup": {"tasks": TASKS, "rows_per_task": ROWS_PER_TASK, "batch_size": dt.BATCH,
                         "workers": dt.WORKERS, "rounds": args.rounds},
               "runs": {k: dt.best(v) for k, v in runs.items()}}
    write(summary, Path(args.out))
    print(json.dumps({k: (v["all_samples_per_s"], v["cpu_ms_per_sample_median"])
                      for k, v in summary["runs"].items()}, indent=1))
    return 0


def write(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "reader_overhead.json").write_text(json.dumps(summary, indent=1) + "\n")
    m, s = summary["machine"], summary["setup"]
    lines = ["# Data path overhead without decoding (benchmarks/reader_overhead.py)", "",
             f"{summary['date']} on {m['cpu']}, {m['cores']} cores; Ray {m['ray']}, torch {m['torch']}. "
             f"{s['tasks']} x {s['rows_per_task']} copies of one decoded ShapesWorld sample (all four "
             f"modalities), {s['workers']} CPU workers, batch {s['batch_size']}, {s['rounds']} rounds.", "",
             "| path | samples/s per round | CPU ms per sample (median) |", "|---|---|---:|"]
    for name, run in summary["runs"].items():
        label = "webdataset-style DataLoader(num_workers=2)" if name == "dataloader" else \
            f"raybind reader blocks of {name.split('_')[1]} rows -> to_torch_batches"
        lines.append(f"| {label} | {run['all_samples_per_s']} | {run['cpu_ms_per_sample_median']} |")
    (out / "reader_overhead.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
