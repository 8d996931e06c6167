"""Set Triton up before any test module imports transformers (which imports Triton): on a machine without a GPU,
`dsv3_lite.kernels.setup_triton()` must switch Triton's CPU interpreter on before Triton is first imported."""

import dsv3_lite.kernels

dsv3_lite.kernels.setup_triton()
