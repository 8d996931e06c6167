"""The exercise checker explains wrong answers; the learner-copy tool blanks every solution."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3_lite.checks import check

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from make_learner_copies import PLACEHOLDER, blank_solutions  # noqa: E402


def test_check_passes_and_says_so(capsys):
    check(torch.ones(2, 3), torch.ones(2, 3), name="ones")
    assert capsys.readouterr().out.strip() == "✓ ones: correct (shape (2, 3), torch.float32)"


@pytest.mark.parametrize("actual, expected, message", [
    (torch.ones(2, 3), torch.ones(3, 2), "shape (2, 3), expected (3, 2)"),
    (torch.ones(2), torch.ones(2, dtype=torch.float64), "dtype torch.float32, expected torch.float64"),
    (torch.tensor([1.0, float("nan")]), torch.ones(2), "1 NaN values (first at index (1,))"),
    (torch.tensor([[1.0, 2.0], [3.0, 4.5]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
     "1 of 4 elements differ beyond atol=1e-05, rtol=1e-05; largest error 0.5 at index (1, 1): got 4.5, expected 4"),
    ([1.0], torch.ones(1), "expected a torch.Tensor, got list"),
])
def test_check_explains_wrong_answers(actual, expected, message):
    with pytest.raises(AssertionError) as e:
        check(actual, expected, name="answer")
    assert message in str(e.value)


def test_blank_solutions_keeps_indentation_and_counts():
    src = "def f(x):\n    # BEGIN SOLUTION\n    y = x + 1\n    return y\n    # END SOLUTION\n\ncheck(f(1), 2)\n"
    out, n = blank_solutions(src)
    assert n == 1
    assert out == f"def f(x):\n    {PLACEHOLDER}\n\ncheck(f(1), 2)\n"


@pytest.mark.parametrize("src", ["# BEGIN SOLUTION\nx = 1\n", "x = 1\n# END SOLUTION\n",
                                 "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION\n"])
def test_blank_solutions_rejects_unbalanced_markers(src):
    with pytest.raises(ValueError, match="SOLUTION"):
        blank_solutions(src)


def test_learner_copies_have_no_solutions_and_no_outputs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_learner_copies.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, check=True)
    assert "01_rmsnorm.ipynb: 1 exercise(s) blanked" in r.stdout
    for nb in tmp_path.glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        text = "".join("".join(c["source"]) for c in cells)
        assert "# BEGIN SOLUTION" not in text and "# END SOLUTION" not in text
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c["cell_type"] == "code")
    rms = json.loads((tmp_path / "01_rmsnorm.ipynb").read_text())["cells"]
    exercise = next("".join(c["source"]) for c in rms if "def my_rms_norm" in "".join(c["source"]))
    assert PLACEHOLDER in exercise and "torch.rsqrt" not in exercise


@pytest.mark.parametrize("name", ["03_rope", "04_mla", "05_ffn", "07_model"])
def test_a_learner_copy_runs_to_its_exercise_and_says_not_yet(tmp_path, name):
    """A learner copy, executed as a learner would (Run All) up to its first exercise: every cell before it runs
    without an error, and the blank exercise prints the checker's "not yet" line, not a traceback. The copies sit one
    folder below the repository's files, as `learner/` does, so `../benchmarks` and `../docs` resolve. A sample of
    the notebooks stands for all (the copies differ from the executed course notebooks only in the blanked cells, the
    learner_mode cell and their folder); the cells after the first exercise are not run, to keep the suite short."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    out = tmp_path / "learner"
    for folder in ("benchmarks", "docs", "dsv3_lite"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_learner_copies.py"), "--out", str(out)],
                   capture_output=True, text=True, check=True)
    assert (out / "figures").is_dir()                         # the diagrams the notebooks link to
    nb = nbformat.read(out / f"{name}.ipynb", as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "NotImplementedError" in c.source)
    nb.cells = nb.cells[:first + 1]
    nbclient.NotebookClient(nb, timeout=600, allow_errors=True, resources={"metadata": {"path": str(out)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    blank = next(i for i, c in enumerate(code) if "NotImplementedError" in c.source)
    for c in code[:blank]:
        assert not [o for o in c.outputs if o.output_type == "error"], c.source[:200]
    said = "".join(o.get("text", "") for o in code[blank].outputs)
    assert "✗ not yet: exercise: write your solution here" in said
    assert not [o for o in code[blank].outputs if o.output_type == "error"]
