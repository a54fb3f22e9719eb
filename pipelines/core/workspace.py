"""The one git-ignored folder that holds local state: deleting it resets everything.

Layout under the work folder (default `.raybind/` in the current directory, or $RAYBIND_HOME):
  data/       generated shards            mlflow/     local MLflow store (sqlite + artifacts)
  ray/        Ray temp dir (sessions)     runs/       Ray Train storage: checkpoints, results
"""

from __future__ import annotations

import os
from pathlib import Path

# The checkout (or editable install) root: configs/, models/ and the job working_dir live here.
REPO = Path(__file__).resolve().parents[2]


def home() -> Path:
    root = Path(os.environ.get("RAYBIND_HOME", ".raybind")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def subdir(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
