"""Run `open_clip_train.main` with this folder's model configs registered (offline, no downloads).

    .venv/bin/python benchmarks/openclip_launcher.py --model raybind-tiny-image-text --pretrained '' ...

open_clip finds model configs only in its own package folder or in paths given to
`open_clip.add_model_config`, which its CLI cannot call: this launcher does, then hands every
argument to `open_clip_train.main.main` unchanged. `benchmarks/configs/raybind-tiny-image-text.json`
is raybind's `tiny` image and text towers as an open_clip CLIP config (same parameter count).
"""

from __future__ import annotations

import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"


def main(argv: list[str]) -> int:
    import open_clip

    open_clip.add_model_config(CONFIGS)
    from open_clip_train.main import main as train_main

    return int(train_main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
