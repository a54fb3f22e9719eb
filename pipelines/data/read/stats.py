"""Skip counters that work across Ray workers: one small named actor (0 CPUs) per Ray job.

Each `ReadStats` is a ledger in that actor (its own id). Each read task sends its shard's
CUMULATIVE counts after a block (at most once a second) and once more at the end of the shard, keyed by
(epoch, shard name); a report replaces the previous one for the same key, so a retried task or a
data set iterated twice never double counts. The actor also enforces `max_failure_fraction`: when
skipped / (good + skipped) exceeds it, after at least `min_samples` samples or once every planned
shard has finished, the reporting task raises `ReaderError` naming the fraction and the top
reasons, which stops the data set. Block reports are not waited for (a task checks the answer to
its previous report when it sends the next one); the end-of-shard report is.

One actor per job rather than per data set: starting an actor costs a Python process (~1 s of CPU
here), and a task's first blocking report would wait for it.

The driver (or a trainer) reads the totals with `ReadStats.snapshot()` while or after iterating.
"""

from __future__ import annotations

import time
import uuid
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


# Out of order: an ordered actor waits for each caller's calls in sequence and fails every queued
# call when one never arrives (CI: a read task cancelled mid-send left a worker's "seq_no" gap, and
# 30 s later the next task's report raised ActorUnavailableError). Reports carry their own order.
@ray.remote(num_cpus=0, allow_out_of_order_execution=True)
class _StatsActor:
    """Ledgers by id: parts {(epoch, shard): counts}, planned / finished shard keys, limits."""

    def __init__(self):
        self.ledgers: dict[str, dict[str, Any]] = {}

    def _ledger(self, ledger_id: str) -> dict[str, Any]:
        return self.ledgers.setdefault(ledger_id, {"parts": {}, "senders": {}, "planned": set(),
                                                   "finished": set(),
                                                   "max_failure_fraction": 1.0, "min_samples": 0})

    def plan(self, ledger_id: str, keys: list[tuple[int, str]], max_failure_fraction: float,
             min_samples: int) -> None:
        ledger = self._ledger(ledger_id)
        ledger["planned"].update(keys)
        ledger["max_failure_fraction"], ledger["min_samples"] = max_failure_fraction, min_samples

    def report(self, ledger_id: str, key: tuple[int, str], counts: dict, final: bool,
               sender: tuple[str, int] = ("", 0)) -> str | None:
        """Store a shard's cumulative counts; return an error message if the limit is exceeded.
        `sender` = (reporter id, sequence number): a report older than the one stored from the same
        reporter is ignored; another reporter (a retried task, a second pass) replaces the counts."""
        ledger = self._ledger(ledger_id)
        reporter, seq = sender
        stored = ledger["senders"].get(key)
        if stored is None or stored[0] != reporter or seq > stored[1]:
            ledger["parts"][key], ledger["senders"][key] = counts, sender
        if final:
            ledger["finished"].add(key)
        totals = sum_counts(ledger["parts"])
        seen = totals["samples_good"] + totals["samples_skipped"]
        all_done = bool(ledger["planned"]) and ledger["planned"] <= ledger["finished"]
        limit = ledger["max_failure_fraction"]
        if (seen >= ledger["min_samples"] or all_done) and totals["failure_fraction"] > limit:
            return failure_message(totals, limit)
        return None

    def snapshot(self, ledger_id: str) -> dict:
        ledger = self._ledger(ledger_id)
        totals = sum_counts(ledger["parts"])
        totals["shards_done"] = len(ledger["finished"])
        totals["shards_planned"] = len(ledger["planned"])
        return totals

    def forget(self, ledger_id: str) -> None:
        self.ledgers.pop(ledger_id, None)


ACTOR_NAME = "raybind-read-stats"
_actors: dict[str, Any] = {}  # job id -> handle: keeps the actor alive between data sets


def shared_actor():
    """This job's stats actor. A named actor still dies when its last handle goes away, and a new
    ReadStats could then get the dying one, so this process keeps a handle for the job's life."""
    job = ray.get_runtime_context().get_job_id()
    if job not in _actors:
        _actors.clear()  # handles of an earlier (shut down) Ray session
        _actors[job] = _StatsActor.options(name=ACTOR_NAME, get_if_exists=True).remote()
    return _actors[job]
REPORT_EVERY_S = 1.0  # block reports per task at most this often (each costs the actor ~5 ms of CPU)


class ReadStats:
    """Handle to the counters of one or more `read_shards` data sets. Create it on the driver (the
    shared actor lives as long as the process that first created it); copies sent to other processes
    read and report into the same ledger, which is freed when the original is garbage collected.

    `snapshot()` -> {samples_good, samples_skipped, skipped: {reason: n}, dropped: {modality reason: n},
    filtered_split, good_per_modality, bytes_per_modality, shard_errors: {shard: reason},
    failure_fraction, shards_done, shards_planned}."""

    def __init__(self):
        self.actor = shared_actor()
        self.id = uuid.uuid4().hex
        self._owner = True  # only the instance made here frees the ledger, not pickled copies

    def __getstate__(self) -> dict:
        return {"actor": self.actor, "id": self.id}

    def __setstate__(self, state: dict) -> None:
        self.actor, self.id, self._owner = state["actor"], state["id"], False

    def plan(self, keys: list[tuple[int, str]], max_failure_fraction: float, min_samples: int) -> None:
        # Not awaited. Should a report overtake the plan, the actor only defers the "all shards
        # done" check (nothing is planned yet).
        self.actor.plan.remote(self.id, keys, max_failure_fraction, min_samples)

    def snapshot(self) -> dict:
        return ray.get(self.actor.snapshot.remote(self.id))

    def __del__(self):
        # After ray.shutdown() an actor call would auto-start a fresh Ray instance (and hang the
        # interpreter's exit in pytest's final gc pass): only free the ledger while Ray is up.
        if not getattr(self, "_owner", False) or not ray.is_initialized():
            return
        try:
            self.actor.forget.remote(self.id)
        except Exception:  # interpreter or Ray shutting down: nothing left to free
            pass


class Reporter:
    """Used inside a read task: sends one shard's cumulative counts; raises ReaderError on excess."""

    def __init__(self, actor, ledger_id: str, key: tuple[int, str], every_s: float = REPORT_EVERY_S):
        self.actor, self.ledger_id, self.key, self.every_s = actor, ledger_id, key, every_s
        self.pending, self.last = None, time.monotonic()
        self.id, self.sent = uuid.uuid4().hex, 0

    def __call__(self, counts: dict, final: bool) -> None:
        if not final and time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        if self.pending is not None and ray.wait([self.pending], timeout=0)[0]:
            self._check(self.pending)
            self.pending = None
        self.sent += 1
        ref = self.actor.report.remote(self.ledger_id, self.key, counts, final, (self.id, self.sent))
        if final:
            self._check(ref)
        elif self.pending is None:  # an unanswered older report is covered by this cumulative one
            self.pending = ref

    @staticmethod
    def _check(ref) -> None:
        message = ray.get(ref)
        if message:
            raise ReaderError(message)
