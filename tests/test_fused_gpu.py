"""The one-pass GELU + FP8 Triton kernel against its torch reference, on the GPU.

Marked `gpu`: the CPU suite deselects it (pyproject's addopts); on the device run `pytest -m gpu`.
The CPU tests (tests/test_fused.py) check the forwards around the op with its reference; this checks
the kernel itself at FLUX.1-dev's two shapes."""

from __future__ import annotations

import pytest
import torch

from app.fused import gelu_quant_reference, gelu_quant_triton

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("prefix_width,width", [(3072, 12288), (0, 12288)])  # single blocks; feed-forwards
def test_kernel_matches_reference(prefix_width, width):
    assert torch.cuda.is_available(), "run with -m gpu on a CUDA machine"
    g = torch.Generator("cuda").manual_seed(0)
    rows = 4608
    h = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16, generator=g)
    bias = torch.randn(width, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    prefix = torch.randn(rows, prefix_width, device="cuda", dtype=torch.bfloat16, generator=g) if prefix_width else None
    q, s = gelu_quant_triton(prefix, h, bias)
    rq, rs = gelu_quant_reference(prefix, h, bias)
    assert q.shape == rq.shape and s.shape == rs.shape
    assert torch.allclose(s, rs, rtol=1e-3, atol=0)  # same amax up to bf16 rounding of the GELU
    differ = (q.view(torch.uint8) != rq.view(torch.uint8)).float().mean().item()
    assert differ < 0.005, f"{differ:.4%} of codes differ"  # one-ulp ties only (0.01% measured)
    deq, rdeq = q.float() * s, rq.float() * rs
    assert ((deq - rdeq).norm() / rdeq.norm()).item() < 0.01
