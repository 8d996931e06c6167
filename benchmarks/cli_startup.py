"""Start-up time of the `dsv3-lite` command: wall time of `dsv3-lite --help` (and of each sub-command's --help) in a
fresh process, next to `python -c pass` (the interpreter's own start-up) measured in the same run.

The target: `--help` answers in under a second on the CI machine (2 cores). `dsv3_lite.cli` imports only the standard
library, so the command pays for Python and argparse, not for PyTorch or Triton (tests/test_imports.py checks which
modules it loads). Median of `--repeats` runs. Usage: python benchmarks/cli_startup.py [--repeats 10]
[--out benchmarks/results/cli_startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from timing import cpu_name, run_info  # benchmarks/timing.py

ROOT = Path(__file__).resolve().parents[1]


def wall_s(cmd: list[str], repeats: int) -> float:
    """Median wall time in seconds of running `cmd` to completion (output discarded; it must exit with 0)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cli_startup.json")
    args = ap.parse_args(argv)
    script = shutil.which("dsv3-lite", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    command = [script] if script else [sys.executable, "-m", "dsv3_lite.cli"]
    results = {"python -c pass": wall_s([sys.executable, "-c", "pass"], args.repeats)}
    for sub in ([], ["prepare"], ["train"], ["generate"], ["demo"]):
        results[" ".join(["dsv3-lite", *sub, "--help"])] = wall_s([*command, *sub, "--help"], args.repeats)
    for name, s in results.items():
        print(f"{name:>32}: {1e3 * s:6.1f} ms")
    record = {
        **run_info(),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "system": platform.platform()},
        "command": command,
        "repeats": args.repeats,
        "median_wall_s": {k: round(v, 4) for k, v in results.items()},
        "target": "dsv3-lite --help under 1 s on the CI machine (2 cores)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
