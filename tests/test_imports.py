"""Imports point one way: every module of the package imports on its own, the graph of module-level imports has no
cycle, and the light entry points load nothing heavy: `import dsv3_lite` imports no submodule, PyTorch, Triton or
transformers and leaves the environment alone; the tokenizer needs only the standard library and `regex`;
`dsv3-lite --help` answers without PyTorch (its speed is measured by benchmarks/cli_startup.py, not here)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dsv3_lite"
HEAVY = ("torch", "numpy", "triton", "transformers", "tokenizers")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from the repository root (so it imports this checkout)."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env if env is not None else os.environ.copy())


def _last_json(r: subprocess.CompletedProcess):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- every module on its own -----------------------------------------------------------------------------------------

def test_modules_found():
    assert {"dsv3_lite", "dsv3_lite.tokenizer", "dsv3_lite.data", "dsv3_lite.data.corpus", "dsv3_lite.data.tokens",
            "dsv3_lite.train", "dsv3_lite.cli", "dsv3_lite.model"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_on_its_own(module):
    """A module that only imports after some other module (an import cycle resolved by luck) fails here."""
    r = _python(f"import importlib; importlib.import_module({module!r})")
    assert r.returncode == 0, f"import {module} in a fresh interpreter failed:\n{r.stderr}"


# --- the static import graph -----------------------------------------------------------------------------------------

def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def imports_at_import_time(module: str) -> set[str]:
    """Modules that `module` imports while it runs: import statements at its top level, also inside top-level
    `if`/`try`/`with` blocks, but not under `if TYPE_CHECKING:` and not inside functions or classes.
    `from a.b import c` counts as `a.b.c` when that is a module of the package, else as `a.b`."""
    found: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:                                   # relative: resolve against this module's package
                    parent = _package_of(module).split(".")
                    parent = parent[:len(parent) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                for a in node.names:
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(MODULES[module].read_text(encoding="utf-8")).body)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports at import time."""
    return {m: {d for d in imports_at_import_time(m) if d in MODULES and d != m} for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}                                    # 1: on the current path, 2: finished
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := dfs(start)):
            return cycle
    return None


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_imports_of_every_kind():
    g = import_graph()
    assert {"dsv3_lite.model", "dsv3_lite.data.tokens", "dsv3_lite.data.corpus"} <= g["dsv3_lite.train"]
    assert {"dsv3_lite.data.corpus", "dsv3_lite.data.tokens"} <= g["dsv3_lite.data"]
    assert g["dsv3_lite"] == set()                    # the lazy package __init__: its imports sit under TYPE_CHECKING


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# --- light modules ---------------------------------------------------------------------------------------------------

def _outside_stdlib(module: str) -> set[str]:
    return {m for m in imports_at_import_time(module)
            if m.split(".")[0] not in sys.stdlib_module_names and m != "__future__"}


def test_tokenizer_needs_only_the_standard_library_and_regex():
    assert _outside_stdlib("dsv3_lite.tokenizer") == {"regex"}
    tree = ast.parse(MODULES["dsv3_lite.tokenizer"].read_text(encoding="utf-8"))
    anywhere = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in anywhere if m.startswith("dsv3_lite")}, "the tokenizer must not import the package"
    loaded = _last_json(_python("import json, sys; import dsv3_lite.tokenizer; print(json.dumps(sorted(m for m in "
                                "sys.modules if m.split('.')[0] in sys.argv[1:] or m.startswith('dsv3_lite.'))))",
                                *HEAVY))
    assert loaded == ["dsv3_lite.tokenizer"]


def test_cli_imports_only_the_standard_library():
    assert _outside_stdlib("dsv3_lite.cli") == set()


def test_import_dsv3_lite_is_light_and_leaves_the_environment_alone():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}    # so that setting it would show
    code = """
import json, os, sys
heavy = sys.argv[1:]
before = dict(os.environ)
import dsv3_lite
after = dict(os.environ)
print(json.dumps({"loaded": sorted(m for m in sys.modules if m.split(".")[0] in heavy or m.startswith("dsv3_lite.")),
                  "changed": sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))}))
"""
    assert _last_json(_python(code, *HEAVY, env=env)) == {"loaded": [], "changed": []}


def test_help_does_not_load_torch_triton_or_transformers():
    """`dsv3-lite --help` (the console script calls `dsv3_lite.cli.main`) and every sub-command's --help."""
    code = """
import json, sys
from dsv3_lite.cli import main
for command in ([], ["prepare"], ["train"], ["generate"], ["demo"]):
    try:
        main([*command, "--help"])
    except SystemExit as e:
        assert e.code == 0, (command, e.code)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton", "transformers"))))
"""
    r = _python(code)
    assert "usage: dsv3-lite" in r.stdout
    assert _last_json(r) == []
