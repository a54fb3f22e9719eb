"""Skip counters that work across Ray workers: one tiny actor per reader (0 CPUs).

Each read task reports its shard's CUMULATIVE counts to the actor after every block it yields and
once more at the end of the shard, keyed by (epoch, shard name). Because a report replaces the
previous one for the same key, a retried task or a data set iterated twice never double counts.
The actor also enforces `max_failure_fraction`: when skipped / (good + skipped) exceeds it, after
at least `min_samples` samples or once every planned shard has finished, the reporting task raises
`ReaderError` naming the fraction and the top reasons, which stops the data set.

The driver (or a trainer) reads the totals with `ReadStats.snapshot()` while or after iterating.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import ray

COUNTER_FIELDS = ("skipped", "dropped", "good_per_modality", "bytes_per_modality")


class ReaderError(RuntimeError):
    """Too much of the data could not be read (max_failure_fraction exceeded)."""


def failure_message(totals: dict, limit: float) -> str:
    top = ", ".join(f"{reason}={n}" for reason, n in Counter(totals["skipped"]).most_common(5))
    return (f"{totals['failure_fraction']:.1%} of samples were skipped ({totals['samples_skipped']} of "
            f"{totals['samples_good'] + totals['samples_skipped']}), more than max_failure_fraction="
            f"{limit:.1%}; top reasons: {top or 'none'}")


def sum_counts(parts: dict[Any, dict]) -> dict:
    """Totals over per-shard count dicts (see ShardCounts.as_dict)."""
    totals: dict[str, Any] = {"samples_good": 0, "samples_skipped": 0, "filtered_split": 0,
                              **{name: Counter() for name in COUNTER_FIELDS}, "shard_errors": {}}
    for (_epoch, shard), part in parts.items():
        totals["samples_good"] += part["good"]
        totals["samples_skipped"] += sum(part["skipped"].values())
        totals["filtered_split"] += part["filtered"]
        for name in COUNTER_FIELDS:
            totals[name].update(part[name])
        if part.get("shard_error"):
            totals["shard_errors"][shard] = part["shard_error"]
    seen = totals["samples_good"] + totals["samples_skipped"]
    totals["failure_fraction"] = totals["samples_skipped"] / seen if seen else 0.0
    for name in COUNTER_FIELDS:
        totals[name] = dict(sorted(totals[name].items()))
    return totals


@ray.remote(num_cpus=0)
class _StatsActor:
    def __init__(self):
        self.parts: dict[tuple[int, str], dict] = {}
        self.planned: set[tuple[int, str]] = set()
        self.finished: set[tuple[int, str]] = set()
        self.max_failure_fraction = 1.0
        self.min_samples = 0

    def plan(self, keys: list[tuple[int, str]], max_failure_fraction: float, min_samples: int) -> None:
        self.planned.update(keys)
        self.max_failure_fraction, self.min_samples = max_failure_fraction, min_samples

    def report(self, key: tuple[int, str], counts: dict, final: bool) -> str | None:
        """Store a shard's cumulative counts; return an error message if the limit is exceeded."""
        self.parts[key] = counts
        if final:
            self.finished.add(key)
        totals = sum_counts(self.parts)
        seen = totals["samples_good"] + totals["samples_skipped"]
        all_done = self.planned <= self.finished
        if (seen >= self.min_samples or all_done) and totals["failure_fraction"] > self.max_failure_fraction:
            return failure_message(totals, self.max_failure_fraction)
        return None

    def snapshot(self) -> dict:
        totals = sum_counts(self.parts)
        totals["shards_done"] = len(self.finished)
        totals["shards_planned"] = len(self.planned)
        return totals


class ReadStats:
    """Handle to the counters of one or more `read_shards` data sets (create it on the driver).

    `snapshot()` -> {samples_good, samples_skipped, skipped: {reason: n}, dropped: {modality reason: n},
    filtered_split, good_per_modality, bytes_per_modality, shard_errors: {shard: reason},
    failure_fraction, shards_done, shards_planned}."""

    def __init__(self):
        self.actor = _StatsActor.remote()

    def plan(self, keys: list[tuple[int, str]], max_failure_fraction: float, min_samples: int) -> None:
        ray.get(self.actor.plan.remote(keys, max_failure_fraction, min_samples))

    def snapshot(self) -> dict:
        return ray.get(self.actor.snapshot.remote())


class Reporter:
    """Used inside a read task: sends one shard's cumulative counts; raises ReaderError on excess."""

    def __init__(self, actor, key: tuple[int, str]):
        self.actor, self.key = actor, key

    def __call__(self, counts: dict, final: bool) -> None:
        message = ray.get(self.actor.report.remote(self.key, counts, final))
        if message:
            raise ReaderError(message)
