"""Set Triton up before any test module imports transformers (which imports Triton): on a machine without a GPU,
`dsv3_lite.kernels.setup_triton()` must switch Triton's CPU interpreter on before Triton is first imported."""

import os

from hypothesis import settings

import dsv3_lite.kernels

dsv3_lite.kernels.setup_triton()
# CI runs the property-based suites on a fixed sequence of examples (a random one could fail a later submission
# for a case nobody changed); locally hypothesis keeps exploring new examples.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
