"""The MLflow model registry: register a trained BindingModel, and turn any model reference
(`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/model`, a local folder) into a local
folder holding `config.json` + `model.safetensors`.

A registered model is an MLflow pyfunc "model from code" (`pipelines/registry/pyfunc.py`, no pickled
Python object) whose artifact `binding/` is the safetensors model folder; the `models/` library is
bundled as code, so `mlflow.pyfunc.load_model("models:/NAME@champion")` works anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from pathlib import Path

from models.reference import REGISTERED_ARTIFACT, RegistryRef, is_registry_ref, parse_registry_ref
from pipelines.core import workspace

REPO = workspace.REPO
CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"


class ModelNotFoundError(ValueError):
    """A model reference names no model, version, alias or folder."""


def register_model(model_dir: str, name: str, run_id: str, tags: dict[str, str] | None = None,
                   set_champion_if_none: bool = True) -> dict:
    """Log the model to `run_id` and register it; alias `candidate` (and `champion` if none yet)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    # Imported here: importing the model-from-code file registers its model with MLflow (set_model).
    from pipelines.registry import pyfunc as mlflow_pyfunc

    active = mlflow.active_run()
    same_run = active is not None and active.info.run_id == run_id
    run_ctx = contextlib.nullcontext() if same_run else mlflow.start_run(run_id=run_id, nested=active is not None)
    with run_ctx, tempfile.TemporaryDirectory() as tmp:
        # MLflow names a logged folder after its basename: stage it as `binding/`, the name loaders expect.
        staged = shutil.copytree(model_dir, Path(tmp) / REGISTERED_ARTIFACT)
        signature = mlflow_pyfunc.signature(model_dir)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(mlflow_pyfunc.__file__)), artifacts={REGISTERED_ARTIFACT: str(staged)},
            code_paths=[str(REPO / "models")], signature=signature, input_example=mlflow_pyfunc.input_example(),
            registered_model_name=name, pip_requirements=mlflow_pyfunc.PIP_REQUIREMENTS)
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CANDIDATE, version)
    aliases = [CANDIDATE]
    if set_champion_if_none and not has_alias(name, CHAMPION):
        client.set_registered_model_alias(name, CHAMPION, version)
        aliases.append(CHAMPION)
    return {"name": name, "version": version, "uri": str(RegistryRef(name, version=version)), "aliases": aliases}


def has_alias(name: str, alias: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().get_model_version_by_alias(name, alias)
        return True
    except MlflowException:
        return False


def check_reference(uri: str) -> None:
    """Fail fast (ModelNotFoundError) if a models:/ reference names no model, version or alias."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not is_registry_ref(uri):
        return
    ref = parse_registry_ref(uri)
    client = MlflowClient()
    try:
        client.get_registered_model(ref.name)
    except MlflowException:
        raise ModelNotFoundError(f"{uri}: no registered model named {ref.name!r}") from None
    try:
        if ref.alias:
            client.get_model_version_by_alias(ref.name, ref.alias)
        else:
            client.get_model_version(ref.name, ref.version)
    except MlflowException:
        what = f"alias {ref.alias!r}" if ref.alias else f"version {ref.version!r}"
        raise ModelNotFoundError(f"{uri}: model {ref.name!r} has no {what}") from None


def local_model_dir(ref: str, tracking_uri: str | None = None) -> str:
    """A local folder with config.json + model.safetensors for any model reference."""
    if ref.startswith(("models:/", "runs:/")):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        check_reference(ref)
        cache = workspace.subdir("models") / hashlib.sha256(ref.encode()).hexdigest()[:16]
        path = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(cache))
        return model_folder(Path(path) / "artifacts" / REGISTERED_ARTIFACT, ref)
    return model_folder(Path(ref), ref)


def model_folder(path: Path, ref: str) -> str:
    """`path` itself, or its `model/` sub-folder (a training checkpoint), if it holds a model."""
    for candidate in (path, path / "model"):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return str(candidate)
    raise ModelNotFoundError(f"{ref}: no model there (expected config.json + model.safetensors in "
                             f"{path} or {path / 'model'})")
