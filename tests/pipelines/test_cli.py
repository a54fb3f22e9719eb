"""The `raybind` console script: help that reads well, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RAYBIND = [str(Path(sys.executable).parent / "raybind")]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYBIND, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for word in ("demo", "data"):
        assert word in out.stdout
    sub = run("data", "synth", "--help")
    assert sub.returncode == 0 and "--shard-size" in sub.stdout and "--set KEY=VALUE" in sub.stdout


def test_unknown_command_exits_2():
    out = run("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--samples", "0"], "samples: must be > 0"),
    (["--shard-size", "-3"], "shard_size: must be > 0"),
    (["--set", "audio_format=mp3"], "audio_format: 'mp3' is not allowed"),
    (["--out", "ftp://somewhere/x"], "unsupported storage scheme 'ftp'"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path):
    out = run("data", "synth", *args, env={"RAYBIND_HOME": str(tmp_path)})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raybind: error:") and message in lines[0], out.stderr


def test_non_empty_output_is_refused_and_kept(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    out = run("data", "synth", "--out", str(tmp_path), "--samples", "4", env={"RAYBIND_HOME": str(tmp_path / "h")})
    assert out.returncode == 2 and "--overwrite" in out.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"


@pytest.mark.slow
def test_synth_end_to_end_json_summary(tmp_path):
    out = run("data", "synth", "--out", str(tmp_path / "ds"), "--samples", "20", "--shard-size", "10", "--json",
              env={"RAYBIND_HOME": str(tmp_path / "home")})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["samples"] == 20 and summary["shards"] == 2
    assert (tmp_path / "ds" / "manifest.json").is_file()
