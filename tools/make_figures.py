"""Draw the course's diagrams: every `tools/figures/<name>.py` writes `notebooks/figures/<name>.svg`.

The notebooks show the diagrams as Markdown images (`![...](figures/<name>.svg)`), which render in JupyterLab and on
GitHub and leave nbval nothing to compare. Each figure module defines `figure() -> matplotlib.figure.Figure`; this
script saves it as SVG with fixed metadata and ids, so that drawing again gives the same file (tests/test_figures.py checks that the committed SVGs are up to date).

Usage: python tools/make_figures.py [--out DIR] [NAME ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
from pathlib import Path

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "tools" / "figures"
OUT = ROOT / "notebooks" / "figures"
STAMP = "drawn by tools/make_figures.py with matplotlib"


def render(name: str) -> str:
    """The SVG text of figure `name` (tools/figures/<name>.py), deterministic."""
    spec = importlib.util.spec_from_file_location(f"figure_{name}", SOURCES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with plt.rc_context({"svg.hashsalt": "dsv3_lite", "svg.fonttype": "path", "font.family": "DejaVu Sans"}):
        fig = module.figure()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
        plt.close(fig)
    return f"<!-- {STAMP} {matplotlib.__version__} -->\n" + buf.getvalue()


def names() -> list[str]:
    return sorted(p.stem for p in SOURCES.glob("*.py") if not p.stem.startswith("_"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("names", nargs="*", help="figures to draw (default: all)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.names or names():
        (a.out / f"{name}.svg").write_text(render(name), encoding="utf-8")
        print("wrote", a.out / f"{name}.svg")


if __name__ == "__main__":
    main()
