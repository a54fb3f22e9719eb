"""`raybind data example tuxpaint`: a real, offline-buildable example data set.

Source: Debian's `tuxpaint-stamps-default` package (the stamp collection of Tux Paint, a drawing
program for children; GPL-2, see /usr/share/doc/tuxpaint-stamps-default/copyright inside it). It is
fetched with `apt-get download` (a package registry, not a data hub) and unpacked with `dpkg-deb -x`.

Layout of the package: `usr/share/tuxpaint/stamps/<category>/.../<stamp>.png` (or `.svg`), next to
`<stamp>.txt` whose FIRST line is the English description (the others are `lang.utf8=...`
translations), optionally `<stamp>.ogg` / `.wav`, the stamp's sound effect, and `<stamp>_desc*.ogg`,
spoken descriptions (not used: they read the caption aloud). `<stamp>_mirror.png` are mirrored
variants of another stamp (skipped), `<stamp>.dat` drawing flags.

Result: one data set of ~950 samples built by `data build`: every described stamp is an image-text
sample, and the ~130 that have a sound effect are image-audio-text samples (audio as 16 kHz mono
flac). `KEY.json` carries `stamp`, `category` (e.g. animals/amphibians), `group` (animals),
`licence` and `source` (the package and its version). Splits come from a hash of the stamp's path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.core import workspace
from pipelines.core.config import require
from pipelines.data.write.build import build_dataset
from pipelines.data.write.build_config import BuildConfig

PACKAGE = "tuxpaint-stamps-default"
LICENCE = "GPL-2"
STAMPS_SUBDIR = Path("usr/share/tuxpaint/stamps")
IMAGE_EXTS = ("png", "svg")  # png preferred: it is what Tux Paint itself shows when both exist
SOUND_EXTS = ("ogg", "wav")


@dataclass(frozen=True)
class TuxpaintConfig:
    out: str = ""  # "" = <work folder>/data/tuxpaint; s3://bucket/prefix works
    cache: str = ""  # where the .deb and its extraction go ("" = <work folder>/cache/tuxpaint)
    deb: str = ""  # an already downloaded .deb: skips apt-get download
    stamps_dir: str = ""  # an already extracted stamps folder: skips apt and dpkg (tests, offline)
    image_max_side: int = 256
    audio_rate: int = 16000
    shard_size: int = 200
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "test": 0.2})
    split_seed: int = 0
    limit: int = 0  # 0 = every stamp; else the first N (by path)
    overwrite: bool = False

    def __post_init__(self):
        require(self.image_max_side >= 16, "image_max_side", "must be >= 16")
        require(self.limit >= 0, "limit", "must be >= 0 (0 = all)")


# ----------------------------------------------------------------------------- getting the package
def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def apt_download(package: str, folder: Path) -> Path:
    """`apt-get download PACKAGE` into `folder`; refreshes the package lists once if apt does not
    know the package yet (a fresh machine has none) and we may (root)."""
    if shutil.which("apt-get") is None:
        raise FileNotFoundError("apt-get not found: run on Debian/Ubuntu, or pass --deb FILE / --stamps-dir DIR")
    folder.mkdir(parents=True, exist_ok=True)
    result = run(["apt-get", "download", package], cwd=folder)
    if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        run(["apt-get", "update", "-qq"])
        result = run(["apt-get", "download", package], cwd=folder)
    debs = sorted(folder.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get download {package} failed ({result.returncode}): {result.stderr.strip()[-500:]}"
                           " (try `apt-get update` first)")
    return debs[-1]


def deb_version(deb: Path) -> str:
    result = run(["dpkg-deb", "-f", str(deb), "Version"])
    return result.stdout.strip() or "unknown"


def extract(deb: Path, folder: Path) -> Path:
    """`dpkg-deb -x` once per .deb (a marker file records a complete extraction); returns the stamps folder."""
    if shutil.which("dpkg-deb") is None:
        raise FileNotFoundError("dpkg-deb not found: run on Debian/Ubuntu, or pass --stamps-dir DIR")
    marker = folder / ".extracted-from"
    if not (marker.is_file() and marker.read_text() == deb.name):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        result = run(["dpkg-deb", "-x", str(deb), str(folder)])
        if result.returncode != 0:
            raise RuntimeError(f"dpkg-deb -x {deb} failed: {result.stderr.strip()[-500:]}")
        marker.write_text(deb.name)
    stamps = folder / STAMPS_SUBDIR
    if not stamps.is_dir():
        raise FileNotFoundError(f"{deb} has no {STAMPS_SUBDIR} folder: not a Tux Paint stamps package?")
    return stamps


def stamps_folder(cfg: TuxpaintConfig, cache: Path) -> tuple[Path, str]:
    """(the stamps folder, a source label) from --stamps-dir, --deb, or apt."""
    if cfg.stamps_dir:
        path = Path(cfg.stamps_dir).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"stamps_dir: {path} is not a folder")
        return path, f"folder {path}"
    deb = Path(cfg.deb).expanduser().resolve() if cfg.deb else apt_download(PACKAGE, cache / "deb")
    if not deb.is_file():
        raise FileNotFoundError(f"deb: {deb} does not exist")
    return extract(deb, cache / "extracted"), f"debian:{PACKAGE} {deb_version(deb)}"


# ----------------------------------------------------------------------------- pairing stamps
def english_description(txt: Path) -> str:
    """The first line of a stamp's .txt: English (the other lines are `lang.utf8=...`)."""
    lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
    first = lines[0].strip() if lines else ""
    return "" if "=" in first.split(" ", 1)[0] else first  # a file that starts with a translation


def find_stamp_files(stamps: Path) -> dict[str, dict[str, Path]]:
    """Stem (path relative to the stamps folder, no extension) -> {extension: file}."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(stamps.rglob("*")):
        ext = path.suffix.lower().lstrip(".")
        if path.is_file() and ext in (*IMAGE_EXTS, *SOUND_EXTS, "txt"):
            stem = path.relative_to(stamps).with_suffix("").as_posix()
            found.setdefault(stem, {})[ext] = path
    return found


def stamp_rows(stamps: Path, source: str) -> tuple[list[dict], dict[str, int]]:
    """One table row per described stamp image, and counts of what was left out and why."""
    rows, left_out = [], {"mirror_variant": 0, "no_description": 0}
    for stem, files in find_stamp_files(stamps).items():
        image = next((files[e] for e in IMAGE_EXTS if e in files), None)
        if image is None or stem.endswith("_mirror"):
            left_out["mirror_variant"] += image is not None
            continue
        caption = english_description(files["txt"]) if "txt" in files else ""
        if not caption:
            left_out["no_description"] += 1
            continue
        sound = next((files[e] for e in SOUND_EXTS if e in files), None)
        category = stem.rsplit("/", 1)[0] if "/" in stem else ""
        rows.append({"key": stem, "image": str(image), "audio": str(sound) if sound else None, "caption": caption,
                     "stamp": stem.rsplit("/", 1)[-1], "category": category, "group": category.split("/", 1)[0],
                     "licence": LICENCE, "source": source})
    return rows, left_out


def write_table(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- the job
def build_config(cfg: TuxpaintConfig, table: Path, out: str) -> BuildConfig:
    return BuildConfig(input=str(table), out=out, name="tuxpaint", key_col="key", image_col="image",
                       audio_col="audio", caption_col="caption", video_col="", splits=dict(cfg.splits),
                       split_seed=cfg.split_seed, shard_size=cfg.shard_size, limit=cfg.limit,
                       image_max_side=cfg.image_max_side, image_format="jpg", audio_rate=cfg.audio_rate,
                       audio_format="flac", overwrite=cfg.overwrite)


def build_tuxpaint(cfg: TuxpaintConfig) -> dict:
    """Fetch (apt) or reuse the package, pair stamps with descriptions and sounds, build the shards."""

    cache = Path(cfg.cache).expanduser().resolve() if cfg.cache else workspace.subdir("cache") / "tuxpaint"
    out = cfg.out or str(workspace.subdir("data") / "tuxpaint")
    stamps, source = stamps_folder(cfg, cache)
    rows, left_out = stamp_rows(stamps, source)
    if not rows:
        raise ValueError(f"{stamps}: no stamp image with an English description found")
    table = write_table(rows, cache / "tables" / "stamps.jsonl")
    summary = build_dataset(build_config(cfg, table, out))
    summary.update({"job": "data example tuxpaint", "source": source, "licence": LICENCE,
                    "stamps_found": len(rows), "with_sound": sum(r["audio"] is not None for r in rows),
                    "left_out": left_out, "table": str(table)})
    return summary
