"""dsv3_lite.kernels.setup_triton (notebooks/01_rmsnorm.ipynb): importing the package decides nothing and changes no
environment variable; the first use of a kernel module (or an explicit call) decides once, and a user can choose."""

import os
import subprocess
import sys
import textwrap

import pytest


def _run(code: str, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter, TRITON_INTERPRET unset unless given."""
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=base | env)


def test_importing_the_package_decides_nothing():
    r = _run("""
        import os, sys
        before = dict(os.environ)
        import dsv3_lite, dsv3_lite.kernels, dsv3_lite.norm, dsv3_lite.fp8
        import torch
        from dsv3_lite.fp8 import FP8Linear
        FP8Linear.from_linear(torch.nn.Linear(256, 64))(torch.randn(2, 256))   # the CPU path needs no Triton
        assert "triton" not in sys.modules, "Triton imported"
        assert dict(os.environ) == before, "environment changed"
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_first_kernel_import_sets_up_automatically():
    r = _run("""
        import os, torch
        from dsv3_lite.kernels.rmsnorm import rms_norm_triton      # asks for `triton`: setup_triton() runs
        import dsv3_lite.kernels as k
        mode = k.triton_mode()
        expected = "compiled" if torch.cuda.is_available() else "interpreter"
        assert mode == expected, (mode, expected)
        assert k.INTERPRET == (mode == "interpreter") and k.COMPILED == (mode == "compiled")
        assert os.environ.get("TRITON_INTERPRET") == ("1" if mode == "interpreter" else None)
        assert k.setup_triton() == mode                            # asking again changes nothing
        print(mode)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in ("compiled", "interpreter")


def test_explicit_choice_and_conflicting_requests():
    r = _run("""
        import os, torch
        import dsv3_lite.kernels as k
        assert k.setup_triton(interpret=True) == "interpreter" and os.environ["TRITON_INTERPRET"] == "1"
        from dsv3_lite.kernels.rmsnorm import rms_norm_triton
        from dsv3_lite.norm import rms_norm
        x, w = torch.randn(3, 100), torch.randn(100)
        assert torch.allclose(rms_norm_triton(x, w), rms_norm(x, w), atol=1e-5)   # CPU tensors, interpreted
        assert k.setup_triton(interpret=True) == "interpreter"
        try:
            k.setup_triton(interpret=False)
        except ValueError as e:
            print(e)
    """)
    assert r.returncode == 0, r.stderr
    assert "setup_triton: interpret = False is not allowed: Triton is already set up in mode 'interpreter'" in r.stdout


@pytest.mark.parametrize("value, mode", [("1", "interpreter"), ("0", "compiled")])
def test_a_user_set_triton_interpret_is_honoured(value, mode):
    r = _run("""
        import os
        import dsv3_lite.kernels as k
        print(k.setup_triton(), os.environ["TRITON_INTERPRET"])
    """, TRITON_INTERPRET=value)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [mode, value]
