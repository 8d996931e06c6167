"""RMSNorm: against transformers and PyTorch, numerics, the Triton kernel on irregular shapes, bad input."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

from dsv3_lite.kernels.rmsnorm import rms_norm_triton
from dsv3_lite.norm import RMSNorm, rms_norm, rms_norm_ref

SHAPES = [(1, 1), (1, 7), (3, 100), (2, 3, 257), (5, 1536), (2, 7168), (0, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 17, 512), (2, 5, 1536)])
def test_bit_identical_to_transformers(shape, dtype):
    torch.manual_seed(0)
    D = shape[-1]
    ours, hf = RMSNorm(D).to(dtype), DeepseekV3RMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        ours.weight.normal_()
        hf.weight.copy_(ours.weight)
    x = torch.randn(shape).to(dtype)
    assert torch.equal(ours(x), hf(x))


def test_matches_torch_rms_norm_in_float32():
    x, w = torch.randn(4, 9, 333), torch.randn(333)
    torch.testing.assert_close(rms_norm(x, w), F.rms_norm(x, (333,), w, 1e-6), rtol=1e-6, atol=1e-6)


def test_float16_large_activations_do_not_overflow():
    x = (torch.randn(4, 7168) * 300).half()
    y = rms_norm(x, torch.ones(7168, dtype=torch.float16))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float().pow(2).mean(-1).sqrt(), torch.ones(4), rtol=1e-2, atol=1e-2)


def test_gradients_flow_to_input_and_weight():
    norm = RMSNorm(16)
    x = torch.randn(3, 16, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_kernel_matches_pytorch(shape, dtype):
    torch.manual_seed(1)
    x, w = torch.randn(shape).to(dtype), torch.randn(shape[-1]).to(dtype)
    torch.testing.assert_close(rms_norm_triton(x, w), rms_norm(x, w), rtol=1e-3, atol=1e-3)


def test_triton_kernel_on_a_strided_view():
    x = torch.randn(6, 200)[:, :100]  # rows 200 apart, last dim contiguous
    w = torch.randn(100)
    torch.testing.assert_close(rms_norm_triton(x, w), rms_norm(x, w), rtol=1e-5, atol=1e-5)
    xt = torch.randn(100, 6).t()  # last dim not contiguous: copied first
    torch.testing.assert_close(rms_norm_triton(xt, w), rms_norm(xt, w), rtol=1e-5, atol=1e-5)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"x.shape\[-1\] = 8 must equal weight.shape\[0\] = 7"):
        rms_norm(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match=r"x.shape\[-1\] = 8 must equal weight.shape\[0\] = 7"):
        rms_norm_triton(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match="weight.dtype = torch.float16 must equal x.dtype = torch.float32"):
        rms_norm_triton(torch.randn(2, 8), torch.ones(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="dim = 0 must be a positive integer"):
        RMSNorm(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 512), (4, 7168)])
def test_fast_path_is_bit_identical_to_the_formula(shape, dtype):
    torch.manual_seed(2)
    x, w = torch.randn(shape).to(dtype), torch.randn(shape[-1]).to(dtype)
    assert torch.equal(rms_norm(x, w), rms_norm_ref(x, w))
    xg = x.float().requires_grad_()
    rms_norm(xg, w.float()).sum().backward()
    xr = x.float().requires_grad_()
    rms_norm_ref(xr, w.float()).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-6)
