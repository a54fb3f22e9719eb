"""Where the served model comes from: an MLflow registry reference (or a local folder) -> a loaded
`BindingModel` plus what to report about it.

An alias is resolved to a version FIRST and that exact version is downloaded, so a concurrent
alias move can never mix two versions; the reported version is the one whose weights are in memory.
Registered models follow pipelines/registry/model_registry.py: the version's artifact `binding/` holds config.json
+ model.safetensors (no pickles).
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from models.checkpoint import load_model
from models.reference import REGISTERED_ARTIFACT, ModelReferenceError, is_registry_ref, parse_registry_ref


@dataclass(frozen=True)
class ModelRef:
    """A resolved reference: `version` is concrete even when the URI named an alias."""

    uri: str
    name: str
    version: str
    alias: str
    run_id: str = ""
    local_dir: str = ""  # set for local folders (no registry)


class ModelSourceError(RuntimeError):
    """The reference names no model / version / alias, or the registry cannot be reached."""


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri or None, registry_uri=tracking_uri or None)


def resolve(uri: str, tracking_uri: str = "") -> ModelRef:
    """Turn any accepted reference into a concrete ModelRef (one registry call for an alias)."""
    if not is_registry_ref(uri):
        folder = Path(uri).expanduser()
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise ModelSourceError(f"{uri}: not a models:/ URI and no config.json + model.safetensors there")
        return ModelRef(uri, folder.name, "", "", local_dir=str(folder))
    from mlflow.exceptions import MlflowException

    try:
        ref = parse_registry_ref(uri)
    except ModelReferenceError as exc:
        raise ModelSourceError(str(exc)) from None
    name, version, alias = ref.name, ref.version, ref.alias
    try:
        mv = client(tracking_uri).get_model_version_by_alias(name, alias) if alias else \
            client(tracking_uri).get_model_version(name, version)
    except MlflowException as exc:
        raise ModelSourceError(f"{uri}: {exc.message if hasattr(exc, 'message') else exc}") from None
    return ModelRef(uri, name, str(mv.version), alias, mv.run_id or "")


def fetch_and_load(ref: ModelRef, tracking_uri: str = ""):
    """Download exactly `ref.version` into a temporary folder, load it, delete the files."""
    if ref.local_dir:
        return load_model(ref.local_dir).eval()
    import mlflow

    tmp = tempfile.mkdtemp(prefix="raybind-serve-model-")
    try:
        # Only the weights folder (2 files), not the whole pyfunc model with its bundled code.
        # Not through a `models:/` artifact URI: MLflow 3.17 resolves those with the process-global
        # registry URI (ModelsArtifactRepository._get_model_uri_infos ignores the registry_uri
        # argument), which in a Serve replica is the default local store, not `tracking_uri`
        # ("Registered Model with name=... not found", the replica fails to start). Ask our own
        # client for the version's storage location instead.
        location = client(tracking_uri).get_model_version_download_uri(ref.name, ref.version)
        if location.startswith("models:/"):
            raise ModelSourceError(f"{ref.uri} (version {ref.version}): storage location {location} is "
                                   "not an artifact store URI")
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location.rstrip('/')}/artifacts/{REGISTERED_ARTIFACT}", dst_path=tmp, tracking_uri=tracking_uri or None)
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ModelSourceError(f"{ref.uri} (version {ref.version}): no artifacts/binding/config.json; "
                                   "was it registered by raybind?")
        return load_model(folder).eval()  # weights live in memory from here on
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe(ref: ModelRef, model, generation: int) -> dict:
    """What /v1/model and every response report about the model in memory. A local folder is
    reported by its name: its absolute path is the server's business, not the client's."""
    uri = ref.name if ref.local_dir else ref.uri
    return {"name": ref.name, "version": ref.version, "alias": ref.alias, "uri": uri, "run_id": ref.run_id,
            "embed_dim": int(model.embed_dim), "modalities": list(model.modalities),
            "loaded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "generation": generation}
