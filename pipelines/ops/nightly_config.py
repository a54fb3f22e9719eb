"""`raybind nightly`'s config, its decision record and the MLflow tags a night writes."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.core import tracking
from pipelines.core.config import require
from pipelines.core.errors import OperationalError
from pipelines.training.pretrain import PretrainConfig

NIGHT_TAG = "raybind.night"
DECISION_TAG = "raybind.nightly.decision"
CHAMPION_BEFORE_TAG = "raybind.nightly.champion_before"


class NightLockedError(OperationalError):
    """Another night holds the lock (the message names its pid and start time)."""


@dataclass(frozen=True)
class NightData:
    root: str = ""  # a data set (has manifest.json) or a folder of date-stamped data sets; "" = <home>/data/nightly
    heldout: str = ""  # the FIXED held-out set every night is judged on; "" = <home>/data/shapesworld
    heldout_split: str = "test"
    max_samples: int = 512
    batch_size: int = 128

    def __post_init__(self):
        require(self.max_samples >= 2, "max_samples", "must be >= 2")


@dataclass(frozen=True)
class GateConfig:
    metrics: tuple[str, ...] = ("mean_R@1",)  # headline names or eval/... metric names; higher is better
    min_margin: float = 0.01  # promote only if EVERY metric >= champion + min_margin

    def __post_init__(self):
        require(len(self.metrics) >= 1, "metrics", "name at least one metric")


@dataclass(frozen=True)
class NightIndex:
    enabled: bool = True
    data: str = ""  # "" = the night's data snapshot
    root: str = ""  # each champion gets <root>/v<version>; "" = <home>/index/nightly
    batch_size: int = 64
    concurrency: int = 1
    num_cpus_per_actor: float = 1.0
    read_cpus_per_task: float = 0.5


@dataclass(frozen=True)
class NightServe:
    enabled: bool = True
    app: str = "raybind"  # the Serve application to point at the new champion and index
    dashboard_url: str = ""  # "" = $RAY_API_SERVER_ADDRESS or the local cluster's
    timeout_s: float = 300.0


@dataclass(frozen=True)
class NightlyConfig:
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # data.train / init / run name are set per night
    data: NightData = field(default_factory=NightData)
    gate: GateConfig = field(default_factory=GateConfig)
    index: NightIndex = field(default_factory=NightIndex)
    serve: NightServe = field(default_factory=NightServe)
    mlflow: tracking.TrackingConfig = field(default_factory=tracking.TrackingConfig)
    lock_file: str = ""  # "" = <home>/locks/nightly.lock
    lock_only: bool = False  # take the lock, report, release (checks a deployment without training)

    def __post_init__(self):
        require(bool(self.mlflow.registered_model), "mlflow.registered_model", "the nightly job needs a model name")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: tuple[str, ...]
    deltas: dict[str, float]


