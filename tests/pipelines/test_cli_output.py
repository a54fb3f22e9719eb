"""What the CLI prints: a job's result alone on stdout (strict JSON with --json, NaN as null), its
progress and Ray's worker logs on stderr; one exit-code map; the demo's summary."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli.errors import EXIT_FAILED, EXIT_USAGE, exit_code
from pipelines.core import strict_json
from pipelines.core.config import ConfigError
from pipelines.ops.cluster import ClusterError
from pipelines.ops.demo import render_demo

REPO = Path(__file__).resolve().parents[2]


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity, as strict parsers (jq, JavaScript) do."""
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"not JSON: {c}")))


def test_strict_json_turns_non_finite_floats_into_null():
    text = strict_json.dumps({"a": math.nan, "b": [1.5, math.inf, -math.inf], "c": Path("/x"), "d": (1, 2)})
    assert strict_loads(text) == {"a": None, "b": [1.5, None, None], "c": "/x", "d": [1, 2]}
    with pytest.raises(ValueError):
        strict_loads(json.dumps({"a": math.nan}))  # the check itself can fail


def test_one_exit_code_map():
    assert exit_code(ConfigError("train.lr: bad")) == EXIT_USAGE
    assert exit_code(FileNotFoundError("x")) == EXIT_USAGE
    assert exit_code(ClusterError("not up")) == EXIT_FAILED
    assert exit_code(TimeoutError()) == EXIT_FAILED
    assert exit_code(RuntimeError("a bug")) is None  # a bug keeps its traceback


def test_demo_summary_has_the_tables_and_one_line_commands():
    summary = {"job": "demo", "samples": 2000, "train_steps": 400, "seconds": 300.0, "synth_seconds": 30.0,
               "train_seconds": 250.0, "shards": "/h/data/shapesworld", "checkpoints": "/h/runs/p",
               "mlflow_run_id": "abc", "registered_model": "models:/raybind-shapesworld/1",
               "aliases": ["candidate", "champion"],
               "retrieval_R@1": {"text->image": 0.9, "image->text": 0.85},
               "zero_shot": {"color": {"image": 1.0, "audio": 0.5}, "direction": {"video": 0.25}},
               "mlflow_ui": "mlflow ui --backend-store-uri sqlite:////h/mlflow/mlflow.db --host 127.0.0.1 --port 5000",
               "next": ["raybind index build --model models:/raybind-shapesworld/1 --data /h/data/shapesworld",
                        "raybind serve --config serving/config.yaml"]}
    text = render_demo(summary)
    lines = text.splitlines()
    assert "  " + summary["mlflow_ui"] in lines  # copyable whole
    assert all("  " + command in lines for command in summary["next"])
    assert any(line.split() == ["text->image", "0.900"] for line in lines)
    assert any(line.split() == ["color", "1.000", "0.500", "-"] for line in lines)
    assert any(line.split() == ["direction", "-", "-", "0.250"] for line in lines)


@pytest.mark.ray
@pytest.mark.slow
def test_evaluate_json_is_strict_and_alone_on_stdout(tmp_path, ray_cluster):
    """`raybind evaluate --json` on data that declares nothing: zero-shot averages are null (they were
    NaN), and Ray's worker logs, which the reader's tasks print, go to stderr."""
    import torch

    from models.binding import BindingModel
    from models.checkpoint import save_model
    from models.config import ModelConfig
    from pipelines.data.write.synth import SynthConfig, synthesize

    torch.manual_seed(0)
    model_dir = save_model(BindingModel(ModelConfig.from_name("tiny").tiny_twin()), tmp_path / "model")
    data = tmp_path / "data"
    synthesize(SynthConfig(out=str(data), samples=40, shard_size=20, seed=0))
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["evaluation"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAYBIND_HOME=str(tmp_path / "home"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = subprocess.run([str(Path(sys.executable).parent / "raybind"), "evaluate", "--model", str(model_dir),
                          "--data", str(data), "--split", "train", "--max-samples", "30", "--json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = strict_loads(out.stdout)
    assert report["job"] == "evaluate" and report["zero_shot_mean_acc"] is None and report["declared"] is False
    assert "[raybind]" not in out.stdout and "pid=" not in out.stdout
    assert out.stderr.strip(), "progress and logs go to stderr"
    shutil.rmtree(tmp_path / "home", ignore_errors=True)


def test_help_and_the_parser_import_no_job_module():
    """`raybind --help` and the parser for one command import neither Ray nor torch nor the other
    jobs' modules: a job's module loads when that job runs (or lists its flags)."""
    code = ("import sys\n"
            "from pipelines.cli.main import build_parser\n"
            "build_parser(['data', 'synth', '--samples', '5'])\n"
            "heavy = sorted(m for m in ('ray', 'torch', 'mlflow', 'pipelines.training.pretrain') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported at parse time: {out.stdout.strip()}"
    assert "pipelines.data.write.synth" not in out.stdout
