"""The import rules in pyproject.toml ([tool.importlinter]) hold: pipelines/ in layers that only
point down, no cycles between sibling modules, the reader used through its public interface,
models/ free of Ray / MLflow / the jobs, serving/ free of the jobs."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout or "broken" not in result.stdout, result.stdout


def test_every_package_folder_is_in_a_layer():
    """A new folder under pipelines/ must be placed in the layers contract, or it escapes it."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    top = {p.name for p in (REPO / "pipelines").iterdir() if (p / "__init__.py").is_file()}
    top = {t for t in top if t != "data"} | {f"data.{p.name}" for p in (REPO / "pipelines" / "data").iterdir()
                                               if (p / "__init__.py").is_file()}
    assert top == named, f"packages {sorted(top)} vs layers {sorted(named)}"
