"""Checkpoints carry checksums: a folder cut short (a truncated file, a missing file, no checksums
at all) is found, and the newest intact checkpoint is used instead, with a warning naming the one
skipped. No Ray: the same functions the driver and the workers call."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.training.data import latest_position, newest_intact_state
from pipelines.training.state import CHECKSUMS_FILE, STATE_FILE, verify_checkpoint, write_checksums


def checkpoint(run_dir: Path, step: int, samples: int) -> Path:
    folder = run_dir / f"checkpoint_step_{step:08d}"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "model" / "config.json").write_text("{}")
    (folder / STATE_FILE).write_text(json.dumps({"step": step, "samples_seen": samples, "mlflow_run_id": "r"}))
    write_checksums(folder)
    return folder


def test_an_intact_checkpoint_verifies_and_any_damage_is_named(tmp_path):
    folder = checkpoint(tmp_path, 4, 64)
    assert verify_checkpoint(folder) is None
    weights = folder / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short
    problem = verify_checkpoint(folder)
    assert problem and "model/model.safetensors" in problem and folder.name in problem
    weights.write_bytes(bytes(reversed(range(256))) * 64)  # same size, other bytes
    assert "checksum" in verify_checkpoint(folder)
    weights.unlink()
    assert "missing" in verify_checkpoint(folder)
    (folder / CHECKSUMS_FILE).unlink()
    assert "not finished" in verify_checkpoint(folder)


def test_the_driver_skips_a_truncated_newest_checkpoint(tmp_path, capsys):
    checkpoint(tmp_path, 4, 64)
    checkpoint(tmp_path, 8, 128)
    newest = checkpoint(tmp_path, 12, 192)
    assert latest_position(str(tmp_path)) == 192
    weights = newest / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])
    assert newest_intact_state(str(tmp_path))["step"] == 8
    assert latest_position(str(tmp_path)) == 128
    warnings = [line for line in capsys.readouterr().err.splitlines() if "skipping checkpoint" in line]
    assert warnings and all(newest.name in line for line in warnings)
    (tmp_path / "checkpoint_step_00000008" / CHECKSUMS_FILE).unlink()  # never finished
    assert newest_intact_state(str(tmp_path))["step"] == 4
    assert latest_position(str(tmp_path / "nothing-here")) == 0
