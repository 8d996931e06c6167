"""environment.yml (conda) and pyproject.toml (pip) must describe the same packages."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PIP = {"pytorch": "torch"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _conda_names() -> set[str]:
    names = set()
    for line in (ROOT / "environment.yml").read_text().splitlines():
        m = re.match(r"^\s+-\s+([A-Za-z][\w.-]*)", line.split("#")[0])
        if m and m.group(1) not in {"pip", "python", "conda-forge"}:
            names.add(CONDA_TO_PIP.get(m.group(1).lower(), m.group(1).lower()))
    return names


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_names = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    conda = _conda_names()
    assert conda == pip_names, (f"only in environment.yml: {sorted(conda - pip_names)}; "
                                f"only in pyproject.toml: {sorted(pip_names - conda)}")


def test_triton_is_linux_only_and_required_packages_present():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    triton = [r for r in project["dependencies"] if _name(r) == "triton"]
    assert triton and "sys_platform == 'linux'" in triton[0]
    dev = {_name(r) for r in project["optional-dependencies"]["dev"]}
    assert {"pytest", "nbval", "jupyterlab", "transformers", "tokenizers", "hypothesis", "ruff"} <= dev


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    i = readme.index("# set up and pass the tests (what CI runs)")
    assert readme[i + 1].endswith("&& pytest"), readme[i + 1]
    assert "grep -A1 '^# set up and pass the tests' README.md" in (ROOT / ".ci" / "run").read_text()
