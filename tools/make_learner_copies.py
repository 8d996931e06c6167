"""Write learner copies of the course notebooks: exercise solutions blanked, all outputs cleared.

In the course notebooks each exercise's reference solution sits between `# BEGIN SOLUTION` and `# END SOLUTION`
(CI runs it, so the exercise's check is known to pass). A workshop hands out copies in which those lines are
replaced by `raise NotImplementedError(...)` at the same indentation, and every cell's outputs and execution count
are cleared so that learners start from a clean page. A cell calling `dsv3_lite.checks.learner_mode()` goes before
the first exercise, so that running a blank exercise prints the checker's "not yet" line instead of a traceback, and
the diagrams (`notebooks/figures/`) are copied beside the notebooks, which show them by relative links.

Usage: python tools/make_learner_copies.py [--out learner/]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION\s*$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
PLACEHOLDER = 'raise NotImplementedError("exercise: write your solution here")'
LEARNER_MODE = {"cell_type": "code", "execution_count": None, "id": "learner-mode", "metadata": {}, "outputs": [],
                "source": ["from dsv3_lite.checks import learner_mode\n", "\n",
                           "learner_mode()  # a blank exercise below prints \"not yet\" instead of a traceback"]}


def blank_solutions(source: str, where: str = "cell") -> tuple[str, int]:
    """Replace each `# BEGIN SOLUTION` ... `# END SOLUTION` block by a placeholder; return (source, blocks replaced).

    >>> blank_solutions("def f():\\n    # BEGIN SOLUTION\\n    return 1\\n    # END SOLUTION\\n")[0]
    'def f():\\n    raise NotImplementedError("exercise: write your solution here")\\n'
    """
    out, inside, n = [], False, 0
    for line in source.splitlines(keepends=True):
        if m := BEGIN.match(line):
            if inside:
                raise ValueError(f"{where}: nested '# BEGIN SOLUTION'")
            inside, n = True, n + 1
            out.append(f"{m.group(1)}{PLACEHOLDER}\n")
        elif END.match(line):
            if not inside:
                raise ValueError(f"{where}: '# END SOLUTION' without '# BEGIN SOLUTION'")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: '# BEGIN SOLUTION' without '# END SOLUTION'")
    return "".join(out), n


def learner_copy(nb_path: Path, out_dir: Path) -> int:
    """Write the learner copy of one notebook; return the number of exercises blanked."""
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    total, first = 0, None
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        src, n = blank_solutions(src, where=f"{nb_path.name}, cell {i}")
        if n and first is None:
            first = i
        total += n
        cell["source"] = src.splitlines(keepends=True)
        cell["outputs"], cell["execution_count"] = [], None
    if first is not None:
        nb["cells"].insert(first, dict(LEARNER_MODE))
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = nb_path.parent / "figures"
    if figures.is_dir():
        shutil.copytree(figures, out_dir / "figures", dirs_exist_ok=True)
    (out_dir / nb_path.name).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "learner", help="folder for the copies (default: %(default)s)")
    args = ap.parse_args(argv)
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        print(f"{nb.name}: {learner_copy(nb, args.out)} exercise(s) blanked")
    print(f"learner copies in {args.out}")


if __name__ == "__main__":
    main()
