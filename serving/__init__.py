"""raybind's Ray Serve application: embed, zero-shot and search endpoints over the library."""

import os as _os

# As in pipelines/__init__.py: bind a local Ray to 127.0.0.1 unless the user says otherwise.
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
