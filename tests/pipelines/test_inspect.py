"""`data inspect`: counts from the index vs what decoded, skip reasons, contact sheet, JSON."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pipelines.data.read.inspect import format_report, inspect_dataset

pytestmark = pytest.mark.ray


def test_inspect_report_table_json_and_contact_sheet(ray_cluster, shapes_dir, small_spec, tmp_path):
    png = tmp_path / "sheet.png"
    report = inspect_dataset(str(shapes_dir), out_png=str(png), spec=small_spec)
    assert report["shards"] == 5 and report["index"] == "manifest.json"
    assert report["samples_indexed"] == report["samples_read"] == report["samples_good"] == 40
    assert report["modalities_present"] == ["image", "text", "audio", "video"]
    assert report["good_per_modality"] == {"audio": 40, "image": 40, "text": 40, "video": 40}
    assert report["skipped"] == {} and report["failure_fraction"] == 0
    assert all(report["bytes_per_modality"][m] > 0 for m in ("image", "text", "audio", "video"))
    assert sum(report["splits_read"].values()) == 40 and report["splits_read"] == report["splits_indexed"]
    json.dumps(report)  # --json must work
    text = format_report(report)
    for word in ("modalities", "skipped samples", "video", "manifest.json", "(none)"):
        assert word in text
    sheet = Image.open(png)
    assert sheet.size[0] >= 5 * 64 and sheet.size[1] >= 8 * 64  # image + 4 frames, 8 rows
    assert len(set(sheet.convert("L").getdata())) > 10  # not blank


def test_inspect_limit_and_skips(ray_cluster, copy_dataset, small_spec):
    path = copy_dataset()
    (path / "shard-000001.tar").write_bytes(b"")  # a broken shard: counted, not fatal
    report = inspect_dataset(str(path / "manifest.json"), spec=small_spec)
    assert report["skipped"] == {"corrupt_tar": 8} and report["samples_good"] == 32
    assert "corrupt_tar" in format_report(report) and report["contact_sheet"] is None
    limited = inspect_dataset(str(path / "shard-00000{0..1}.tar"), limit=5, spec=small_spec)
    assert limited["shards"] == 2 and limited["samples_indexed"] == 16
    assert 5 <= limited["samples_read"] <= 16 and limited["limit"] == 5
