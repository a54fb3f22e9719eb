"""Operations pieces that need no cluster: the promotion gate, the newest data snapshot, the nightly
lock (two real processes), the Serve retargeting, the cron entry, and the CLI's early errors
(`submit` validates before contacting anything; `cluster status` without a cluster)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.ops.night_records import decide, newest_snapshot, night_lock
from pipelines.ops.serve_roll import retarget_serve_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """`raybind ARGS` in this process (the CLI's own main) with its own work folder: (exit code, out, err)."""
    from pipelines.cli.main import main

    monkeypatch.setenv("RAYBIND_HOME", str(tmp_path))
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


def raybind(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """`raybind ARGS` as a separate process (for the lock: another process must hold it)."""
    env = dict(os.environ, RAYBIND_HOME=str(home))
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "pipelines.cli.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- the gate
def test_gate_promotes_only_when_every_metric_beats_the_margin():
    champion = {"mean_R@1": 0.40, "zero_shot_mean_acc": 0.50}
    better = decide({"mean_R@1": 0.45, "zero_shot_mean_acc": 0.52}, champion, ("mean_R@1", "zero_shot_mean_acc"), 0.01)
    assert better.promote and better.deltas["mean_R@1"] == pytest.approx(0.05)
    worse = decide({"mean_R@1": 0.30, "zero_shot_mean_acc": 0.60}, champion, ("mean_R@1", "zero_shot_mean_acc"), 0.0)
    assert not worse.promote and "FAIL" in worse.reasons[0] and "pass" in worse.reasons[1]
    within_margin = decide({"mean_R@1": 0.405}, champion, ("mean_R@1",), 0.01)
    assert not within_margin.promote and "+0.0050" in within_margin.reasons[0]
    exactly_margin = decide({"mean_R@1": 0.41}, champion, ("mean_R@1",), 0.01)
    assert exactly_margin.promote


def test_gate_refuses_missing_or_nan_metrics():
    missing = decide({"other": 1.0}, {"mean_R@1": 0.1}, ("mean_R@1",), 0.0)
    assert not missing.promote and "missing or NaN for the candidate" in missing.reasons[0]
    nan = decide({"mean_R@1": 0.9}, {"mean_R@1": float("nan")}, ("mean_R@1",), 0.0)
    assert not nan.promote and "champion" in nan.reasons[0]


# ----------------------------------------------------------------------------- data snapshot
def test_newest_snapshot_picks_the_last_dated_folder_and_hashes_its_manifest(tmp_path):
    for name, content in (("2026-11-26", "a"), ("2026-11-27", "b"), ("2026-11-28-incomplete", None)):
        (tmp_path / name).mkdir()
        if content:
            (tmp_path / name / "manifest.json").write_text(json.dumps({"x": content}))
    url, night = newest_snapshot(str(tmp_path))
    assert url.endswith("/2026-11-27") and night.startswith("2026-11-27-")  # no manifest = not complete
    (tmp_path / "2026-11-27" / "manifest.json").write_text(json.dumps({"x": "changed"}))
    assert newest_snapshot(str(tmp_path))[1] != night  # rewritten data = a new night
    assert newest_snapshot(str(tmp_path / "2026-11-26"))[0].endswith("2026-11-26")  # a data set itself
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        newest_snapshot(str(tmp_path / "2026-11-28-incomplete"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        newest_snapshot(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- the lock
def test_a_second_nightly_is_refused_while_the_lock_is_held(tmp_path):
    lock = tmp_path / "nightly.lock"
    with night_lock(str(lock)):
        refused = raybind("nightly", "--set", f"lock_file={lock}", "--set", "lock_only=true", home=tmp_path)
        assert refused.returncode == 1, refused.stderr
        assert "another nightly run holds" in refused.stderr and f"pid {os.getpid()}" in refused.stderr
    with night_lock(str(lock)):  # released when the holder ends: the next night may start
        pass


# ----------------------------------------------------------------------------- Serve
def test_retarget_changes_only_user_configs_and_keeps_the_rest():
    deployed = {"name": "raybind", "import_path": "serving.app:build_app", "args": {"gateway": {"token_env": "T"}},
                "deployments": [{"name": "Embedder", "user_config": {"model_uri": "models:/m@champion",
                                                                     "refresh_s": 30}},
                                {"name": "Gateway", "num_replicas": 1}]}
    new = retarget_serve_config(deployed, "models:/m/7", "/idx/v7")
    deps = {d["name"]: d for d in new["deployments"]}
    assert deps["Embedder"]["user_config"] == {"model_uri": "models:/m/7", "refresh_s": 30}
    assert deps["Searcher"]["user_config"] == {"index_path": "/idx/v7"}
    assert new["args"] == deployed["args"] and deps["Gateway"] == {"name": "Gateway", "num_replicas": 1}
    assert deployed["deployments"][0]["user_config"]["model_uri"] == "models:/m@champion"  # input untouched


# ----------------------------------------------------------------------------- schedule
def test_schedule_line_runs_the_real_cli_and_reinstall_replaces_it(tmp_path, cli):
    from pipelines.cli.main import build_parser

    code, out, err = cli("schedule", "install", "--print", "--cron", "30 3 * * *")
    assert code == 0, err
    line = out.strip()
    assert line.startswith("30 3 * * * flock -n ") and line.endswith("# raybind-nightly")
    inner = shlex.split(shlex.split(line.split(" ", 5)[5])[5])  # flock -n LOCK sh -c "<this>"
    raybind_argv = inner[inner.index("&&") + 2:]
    assert Path(raybind_argv[0]).is_file() and Path(raybind_argv[0]).name == "raybind"
    parser = build_parser()
    args = parser.parse_args(raybind_argv[1:])  # the entry's arguments are valid for the real CLI
    assert args.pipeline == ["nightly"] and args.follow and Path(args.config).is_file()

    cron_file = tmp_path / "cron.d" / "raybind"
    cron_file.parent.mkdir()
    cron_file.write_text("MAILTO=ops\n5 * * * * root true\n")
    for when in ("0 2 * * *", "0 4 * * *"):
        assert cli("schedule", "install", "--cron", when, "--cron-file", str(cron_file))[0] == 0
    lines = cron_file.read_text().splitlines()
    assert lines[:2] == ["MAILTO=ops", "5 * * * * root true"] and len(lines) == 3 and lines[2].startswith("0 4 * * * ")

    code, _, err = cli("schedule", "install", "--print", "--cron", "every night")
    assert code == 2 and "is not a cron schedule" in err


# ----------------------------------------------------------------------------- early CLI errors
def test_submit_validates_before_contacting_a_cluster(cli):
    code, _, err = cli("submit", "pretrian")
    assert code == 2 and "unknown pipeline 'pretrian'" in err and "index build" in err
    code, _, err = cli("submit", "pretrain", "--set", "train.stepz=3")
    assert code == 2 and "train.stepz" in err
    code, _, err = cli("submit", "pretrain", "--set", "train.steps=3")
    assert code == 1 and "raybind cluster up" in err


def test_cluster_commands_without_a_cluster(cli):
    code, _, err = cli("cluster", "status")
    assert code == 1 and "no local cluster" in err
    code, out, err = cli("cluster", "down")  # progress goes to stderr, the summary alone to stdout
    assert code == 0 and "nothing to stop" in err and "nothing to stop" not in out and "cluster down" in out
    code, _, err = cli("cluster", "env")
    assert code == 1 and "raybind cluster up" in err
