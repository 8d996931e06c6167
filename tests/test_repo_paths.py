"""Nothing in the repository points outside it: a learner who clones the course can open every file it cites.

Scans every tracked text file (notebooks' cells included) for references to folders that exist only on the machines
the course was built on, and every relative Markdown link for a target that is missing or lies outside the
repository."""

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = (".md", ".py", ".ipynb", ".toml", ".yml", ".yaml", ".cfg", ".txt")
OUTSIDE = re.compile(r"shared[/]reference|shared[/]STYLE|\.\./shared/|/work/|\.library/")   # [/]: not a hit itself
LINK = re.compile(r"\]\(([^)\s]+)\)")          # [text](target) in Markdown
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)  # fenced and inline code, where ]( is not a link


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / p for p in out.splitlines() if p.endswith(TEXT) and (ROOT / p).is_file()]


def texts(path: Path) -> list[tuple[str, str, bool]]:
    """(where, text, is_markdown) for a file, or for each cell of a notebook."""
    if path.suffix != ".ipynb":
        return [(str(path.relative_to(ROOT)), path.read_text(encoding="utf-8"), path.suffix == ".md")]
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [(f"{path.relative_to(ROOT)} cell {i}", "".join(c["source"]), c["cell_type"] == "markdown")
            for i, c in enumerate(cells)]


def test_no_reference_to_folders_outside_the_repository():
    found = [f"{where}: {m.group(0)!r}" for path in tracked_files() if path.name != Path(__file__).name
             for where, text, _ in texts(path) for m in OUTSIDE.finditer(text)]
    assert not found, "references to folders outside the repository:\n" + "\n".join(found)


def test_relative_markdown_links_stay_inside_and_exist():
    bad = []
    for path in tracked_files():
        for where, text, markdown in texts(path):
            if not markdown:
                continue
            for target in LINK.findall(CODE.sub("", text)):
                if re.match(r"[a-z]+:", target) or target.startswith("#"):
                    continue                                   # a web address, or an anchor in the same file
                file = (path.parent / target.split("#")[0]).resolve()
                if not file.is_relative_to(ROOT):
                    bad.append(f"{where}: {target} leaves the repository")
                elif not file.exists():
                    bad.append(f"{where}: {target} does not exist")
    assert not bad, "\n".join(bad)


def test_the_checks_fire():
    """The patterns find what they must: a pointer into the team's folder and a link out of the repository."""
    assert OUTSIDE.search("see shared/" "reference/deepseek_v3.md §3")
    assert LINK.findall("read [the notes](../../elsewhere.md#top)") == ["../../elsewhere.md#top"]
    assert LINK.findall(CODE.sub("", "launch `kernel[grid](*args)`")) == []
