"""Serving fixtures: a short-trained model (image + text, seconds on 2 cores) and a second one,
both registered in the session's real `mlflow server`; small media files; the token file.
Nothing here mocks Ray, MLflow or the model."""

from __future__ import annotations

from pathlib import Path

import pytest
from serving_helpers import REGISTERED, TOKEN, train_quick_model


@pytest.fixture(scope="session")
def media() -> dict[str, bytes]:
    """One small valid file per media modality (a ShapesWorld sample's own jpg / wav / mp4)."""
    from pipelines.data.write import shapesworld

    sample = shapesworld.render_sample(shapesworld.make_scene(0, 7), shapesworld.MediaSpec(), "000000007")
    return {"image": sample["jpg"], "audio": sample["wav"], "video": sample["mp4"]}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """`trained` (version 1, champion) and `other` (an untrained twin: version 2, candidate)."""
    import torch

    from models.binding import BindingModel
    from models.checkpoint import save_model
    from models.config import ModelConfig

    root = tmp_path_factory.mktemp("serving_models")
    # One thread: on 2 shared, busy cores torch's spinning intra-op threads made this 100-step
    # run 16x slower (179 s vs 11 s measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = train_quick_model(root / "trained")
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(1)
    other = save_model(BindingModel(ModelConfig.from_name("tiny").tiny_twin()).eval(), root / "other")
    return {"trained": trained, "other": other}


@pytest.fixture(scope="session")
def registry(mlflow_server, model_dirs) -> dict:
    """Both models registered under REGISTERED in the real MLflow server: v1 champion, v2 candidate."""
    import mlflow

    from pipelines.registry.model_registry import register_model

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    mlflow.set_experiment("serving-tests")
    versions = {}
    for which in ("trained", "other"):
        with mlflow.start_run(run_name=f"serving-{which}") as run:
            versions[which] = register_model(str(model_dirs[which]), REGISTERED, run.info.run_id)["version"]
    return {"tracking_uri": mlflow_server, "name": REGISTERED, "versions": versions,
            "champion": f"models:/{REGISTERED}@champion", "candidate": f"models:/{REGISTERED}@candidate"}


@pytest.fixture(scope="session")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serving_token") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)  # the Gateway refuses a token file that others can read
    return path
