"""raybind's jobs: data, training, evaluation and operations on Ray, tracked in MLflow."""

import os as _os

# Ray reads this when it is first imported, not at ray.init(): set before any `import ray` so a
# local cluster binds and advertises 127.0.0.1 only (a user's own setting wins).
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
