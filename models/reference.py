"""Model registry references, parsed: `models:/NAME@ALIAS` and `models:/NAME/VERSION`.

Only the string form lives here (the library knows no MLflow); resolving a reference to weights is
done where MLflow is: `pipelines/registry/model_registry.py` for the jobs, `serving/model_source.py`
for the Serve app.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEME = "models:/"
# The folder inside a registered version's artifacts that holds config.json + model.safetensors.
REGISTERED_ARTIFACT = "binding"


class ModelReferenceError(ValueError):
    """A `models:/` string that is neither NAME@ALIAS nor NAME/VERSION."""


@dataclass(frozen=True)
class RegistryRef:
    """Exactly one of `version` and `alias` is set."""

    name: str
    version: str = ""
    alias: str = ""

    def __str__(self) -> str:
        return f"{SCHEME}{self.name}@{self.alias}" if self.alias else f"{SCHEME}{self.name}/{self.version}"


def is_registry_ref(uri: str) -> bool:
    return uri.startswith(SCHEME)


def parse_registry_ref(uri: str) -> RegistryRef:
    """models:/NAME@ALIAS -> RegistryRef(NAME, alias=ALIAS); models:/NAME/VERSION -> RegistryRef(NAME, VERSION)."""
    ref = uri[len(SCHEME):] if is_registry_ref(uri) else ""
    if "@" in ref:
        name, _, alias = ref.partition("@")
        if name and alias and "/" not in alias and "/" not in name:
            return RegistryRef(name, alias=alias)
    else:
        name, _, version = ref.partition("/")
        if name and version.isdigit():
            return RegistryRef(name, version=version)
    raise ModelReferenceError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
