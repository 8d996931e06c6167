"""The course's diagrams (tools/figures/*.py → notebooks/figures/*.svg): every one is committed, up to date with the
code that draws it, and shown by a notebook."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_figures import OUT, names, render  # noqa: E402


@pytest.mark.parametrize("name", names())
def test_figure_is_committed_and_up_to_date(name):
    """The committed SVG is what the code draws; compared byte for byte when this matplotlib drew it (another
    version lays out text differently), else only its first line, which names the drawing script."""
    svg = OUT / f"{name}.svg"
    assert svg.is_file(), f"{svg} is missing: run python tools/make_figures.py {name}"
    committed, drawn = svg.read_text(encoding="utf-8"), render(name)
    if committed.splitlines()[0] == drawn.splitlines()[0]:
        assert committed == drawn, f"{svg} is stale: run python tools/make_figures.py {name}"
    else:
        assert committed.startswith("<!-- drawn by tools/make_figures.py"), f"{svg} was not drawn by make_figures"


def test_every_figure_is_shown_by_a_notebook():
    shown = "".join("".join(c["source"]) for nb in sorted((ROOT / "notebooks").glob("*.ipynb"))
                    for c in json.loads(nb.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "markdown")
    missing = [n for n in names() if f"figures/{n}.svg" not in shown]
    assert not missing, f"figures no notebook shows: {missing}"
