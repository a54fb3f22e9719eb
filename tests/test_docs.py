"""The documentation: the MkDocs site builds in strict mode, the README stays a short front door,
user-facing pages carry no dates, clock times or issue numbers (only docs/benchmarks.md records
when and where each figure was measured), and the README's links into docs/ resolve."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_BYTES = 15_000
# The one page allowed to say when and on what machine each figure was measured.
DATED_PAGES = {DOCS / "benchmarks.md"}

DATE = re.compile(r"20\d\d-\d\d-\d\d")
# A clock time such as 18:38 or 9:05 (also the start of 18:38:05), but not part of an address or a
# number: no digit, dot or colon right before it (127.0.0.1:8000, 8265:8265) and no digit after it
# (127.0.0.1:80 is not preceded by a space; 5000:5000 fails both sides).
CLOCK = re.compile(r"(?<![\d.:])(?:[01]?\d|2[0-3]):[0-5]\d(?!\d)")
ISSUE = re.compile(r"\bissue #?\d", re.IGNORECASE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def undated_pages() -> list[Path]:
    return [README, *sorted(p for p in DOCS.glob("*.md") if p not in DATED_PAGES)]


def history_marks(text: str) -> list[str]:
    """Every date, clock time or issue reference in `text`, as `line N: match`."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for pattern in (DATE, CLOCK, ISSUE):
            found += [f"line {n}: {m.group(0)!r} in {line.strip()!r}" for m in pattern.finditer(line)]
    return found


def docs_links(text: str) -> list[str]:
    """Relative link targets in `text` that point into docs/."""
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if re.match(r"(\./)?docs/", t)]


# ----------------------------------------------------------------------------- the checks themselves
@pytest.mark.parametrize("line", [
    "Measured 2026-11-28 on 2 cores.",
    "Last full run (23:20): 319 passed.",
    "the demo ran at 9:05 and again at 19:47:12",
    "see issue #7 for the target",
    "as Issue 5 asked",
    "rerun at 18:38, 19:10 and 19:47",
])
def test_history_check_catches_dated_lines(line):
    assert history_marks(line), line


@pytest.mark.parametrize("line", [
    "raybind serve prints the URL (http://127.0.0.1:8000)",
    "kubectl -n raybind port-forward svc/raybind-head-svc 8265:8265 &",
    "kubectl -n raybind port-forward svc/mlflow 5000:5000 &",
    "mlflow ui --backend-store-uri sqlite:///$PWD/.raybind/mlflow/mlflow.db --host 127.0.0.1 --port 5000",
    "bound to 0.0.0.0:8000 and 127.0.0.1:80",
    "raybind schedule install --cron '0 2 * * *'",
    "image: ghcr.io/raybind/raybind:2.60.0 and bitnami/kubectl:1.31",
    "open the issues page; 3x128x128 inputs; R@1 0.97",
])
def test_history_check_passes_commands_and_addresses(line):
    assert history_marks(line) == [], line


def test_docs_link_finder():
    text = "[a](docs/data.md) [b](./docs/x.md#anchor) [c](https://example.com/docs/y.md) [d](infra/README.md)"
    assert docs_links(text) == ["docs/data.md", "./docs/x.md#anchor"]


# ----------------------------------------------------------------------------- the documentation
def test_mkdocs_builds_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; keep it under {README_MAX_BYTES} (move detail to docs/)"


def test_user_docs_carry_no_dates_clock_times_or_issue_numbers():
    pages = undated_pages()
    assert README in pages and len(pages) > 1
    problems = {str(p.relative_to(REPO)): marks for p in pages if (marks := history_marks(p.read_text()))}
    assert not problems, ("dates, clock times and issue numbers belong in docs/benchmarks.md only: "
                          f"{problems}")


def test_readme_links_into_docs_exist():
    links = docs_links(README.read_text())
    assert links, "README.md links to no page under docs/"
    missing = [t for t in links if not (REPO / t.split("#", 1)[0]).is_file()]
    assert not missing, f"README.md links to missing docs pages: {missing}"


def test_code_comments_say_why_not_when():
    """No dates or issue numbers in the library, the jobs or the Serve app (benchmarks and tests may
    name the data they were run on)."""
    sources = [p for folder in ("models", "pipelines", "serving") for p in (REPO / folder).rglob("*.py")]
    assert len(sources) > 50
    found = {str(p.relative_to(REPO)): marks for p in sources
             if (marks := DATE.findall(p.read_text()) + ISSUE.findall(p.read_text()))}
    assert not found, f"dates / issue numbers in code comments: {found}"
