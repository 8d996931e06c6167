"""dsv3_lite imports and runs where Triton cannot be installed (macOS): PyTorch paths work, kernels say why not."""

import os
import subprocess
import sys
import textwrap

BLOCK_TRITON = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # as if not installed: `import triton` fails, importlib.util.find_spec finds nothing
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TRITON + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_norm_works_without_triton():
    r = _run("""
        import torch
        from dsv3_lite.norm import RMSNorm, rms_norm
        from dsv3_lite.kernels.rmsnorm import rms_norm_triton
        from dsv3_lite.kernels import HAS_TRITON, triton_mode
        assert not HAS_TRITON and triton_mode() == "unavailable"
        x = torch.randn(2, 3, 64)
        y = RMSNorm(64)(x)
        assert y.shape == x.shape and torch.allclose(y.pow(2).mean(-1), torch.ones(2, 3), atol=1e-4)
        try:
            rms_norm_triton(x, torch.ones(64))
        except RuntimeError as e:
            assert "Triton is not installed" in str(e), e
            print("refused:", e)
        else:
            raise AssertionError("launching a kernel without Triton must raise")
    """)
    assert r.returncode == 0, r.stderr
    assert "refused: cannot launch Triton kernel _rms_norm_fwd_kernel" in r.stdout


def test_fp8linear_without_triton_uses_the_pytorch_path():
    """Where Triton cannot be installed, FP8Linear still runs (reference path) and the kernels say why they cannot."""
    r = _run("""
        import torch
        import dsv3_lite.fp8 as F
        import dsv3_lite.kernels.fp8 as KF
        layer = F.FP8Linear.from_linear(torch.nn.Linear(256, 130))
        y = layer(torch.randn(3, 256))
        assert y.shape == (3, 130) and torch.isfinite(y).all()
        try:
            KF.act_quant(torch.randn(2, 128))
        except RuntimeError as e:
            print("refused:", e)
    """)
    assert r.returncode == 0, r.stderr
    assert "refused: cannot launch Triton kernel _act_quant_kernel" in r.stdout, r.stdout


def test_fp8_reference_path_checks_input_and_keeps_nan_without_triton():
    """The FP8 layers' input checks and the references' NaN rule need no Triton either."""
    r = _run("""
        import torch
        import dsv3_lite.fp8 as F
        layer = F.FP8Linear.from_linear(torch.nn.Linear(256, 130))
        x = torch.randn(3, 256)
        x[1, 7] = float("nan")
        y = layer(x)
        print("NaN rows:", y.isnan().all(-1).tolist(), "finite elsewhere:", bool(y[[0, 2]].isfinite().all()))
        for bad in (lambda: layer(torch.ones(3, 256, dtype=torch.int64)), lambda: layer(torch.ones(3, 384)),
                    lambda: F.weight_dequant_ref(layer.weight, layer.scale, dtype=torch.int8)):
            try:
                bad()
            except ValueError as e:
                print("refused:", e)
    """)
    assert r.returncode == 0, r.stderr
    assert "NaN rows: [False, True, False] finite elsewhere: True" in r.stdout, r.stdout
    assert r.stdout.count("refused:") == 3 and "in_features = 256" in r.stdout and "dtype = torch.int8" in r.stdout


def test_public_api_imports_without_triton():
    """Every module imports, except the Hopper-only Gluon kernel, which is imported only on an sm_90 GPU."""
    r = _run("""
        import pkgutil, importlib, dsv3_lite
        for m in pkgutil.walk_packages(dsv3_lite.__path__, "dsv3_lite."):
            if m.name == "dsv3_lite.kernels.fp8_gluon":
                try:
                    importlib.import_module(m.name)
                except ImportError as e:
                    print("fp8_gluon needs Triton:", e)
                continue
            importlib.import_module(m.name)
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert "fp8_gluon needs Triton" in r.stdout and r.stdout.strip().endswith("ok")


def test_triton_imported_before_dsv3_lite_on_cpu_is_refused_clearly():
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, torch
        os.environ.pop("TRITON_INTERPRET", None)
        if torch.cuda.is_available():
            print("skip: has a GPU"); raise SystemExit
        import triton.language                      # as transformers does, before dsv3_lite
        from dsv3_lite.kernels import triton_mode
        from dsv3_lite.norm import RMSNorm
        from dsv3_lite.kernels.rmsnorm import rms_norm_triton
        assert triton_mode() == "unavailable", triton_mode()
        RMSNorm(8)(torch.randn(2, 8))                # the PyTorch path still works
        try:
            rms_norm_triton(torch.randn(2, 8), torch.ones(8))
        except RuntimeError as e:
            print(e)
    """)], capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert r.returncode == 0, r.stderr
    assert "skip: has a GPU" in r.stdout or "setup_triton() before importing transformers" in r.stdout, r.stdout
