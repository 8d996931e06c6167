"""ruff keeps the package, tools, tests and benchmarks clean (notebooks are checked through the generated package)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check():
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    assert ruff, "ruff is a dev dependency: pip install -e '.[dev]'"
    r = subprocess.run([ruff, "check", "dsv3_lite", "tools", "tests", "benchmarks"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
