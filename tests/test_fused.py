"""app.fused on the CPU: which blocks get the one-pass GELU + FP8 forward, that the rebound forwards
compute what diffusers' do (up to the activation quantization they add), that the op's reference is
FP8Linear's quantizer applied to diffusers' ops, and that torch.compile traces it whole.

The Triton kernel itself needs a GPU: `python -m bench quant` checks it there against
`gelu_quant_reference` (H200: 0.01% of codes one step apart, scales identical; quant_kernel_h200.json).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from app.families.flux import FAMILY as FLUX
from app.families.sdxl import FAMILY as SDXL
from weights.fp8 import FP8Linear, quantize_rows
from app.fused import fuse_gelu_quant, gelu_quant, gelu_quant_reference
from app.optimize import quantize_denoiser


def _flux_fp8(dtype=torch.float32):
    """The tiny FLUX transformer with FP8 linears whose biases are not zero (the tiny model's are), so a
    bias dropped or added twice by a rebound forward shows."""
    torch.manual_seed(0)
    d = FLUX.build_tiny().transformer.to(dtype)
    quantize_denoiser(d, "fp8", FLUX.skips)
    g = torch.Generator().manual_seed(1)
    for m in d.modules():
        if isinstance(m, FP8Linear) and m.bias is not None:
            m.bias = (0.5 * torch.randn(m.bias.shape, generator=g)).to(m.bias.dtype)
    return d


def _inputs(d, tokens=64, text=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, dt = d.config, d.dtype
    rnd = lambda *s: torch.randn(*s, generator=g).to(dt)  # noqa: E731
    return dict(hidden_states=rnd(1, tokens, c.in_channels), encoder_hidden_states=rnd(1, text, c.joint_attention_dim),
                pooled_projections=rnd(1, c.pooled_projection_dim), timestep=torch.tensor([0.5], dtype=dt),
                img_ids=torch.zeros(tokens, 3, dtype=dt), txt_ids=torch.zeros(text, 3, dtype=dt),
                guidance=torch.tensor([3.5], dtype=dt), return_dict=False)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_reference_is_fp8linears_quantizer_on_diffusers_ops():
    g = torch.Generator().manual_seed(0)
    a, h = torch.randn(6, 8, generator=g).bfloat16(), (3 * torch.randn(6, 24, generator=g)).bfloat16()
    bias = torch.randn(24, generator=g).bfloat16()
    for prefix in (a, None):
        x = F.gelu(h + bias, approximate="tanh")
        x = x if prefix is None else torch.cat([prefix, x], dim=-1)
        want_q, want_s = quantize_rows(x)
        got_q, got_s = gelu_quant(prefix, h, bias)  # the registered op, CPU branch
        assert got_q.dtype == torch.float8_e4m3fn and got_q.shape == x.shape and got_s.shape == (6, 1)
        assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(got_s, want_s)
        assert _rel(got_q.float() * got_s, x) < 0.05  # and it is a quantization of x, not of h
    assert _rel(gelu_quant_reference(None, h, bias)[0].float(), gelu_quant_reference(None, h, bias * 0)[0].float()) > 0.01


def test_the_flux_blocks_with_fp8_linears_are_rebound_once():
    d = _flux_fp8()
    singles, doubles = len(d.single_transformer_blocks), len(d.transformer_blocks)
    assert fuse_gelu_quant(d) == singles + 2 * doubles  # each single block; each double block's ff and ff_context
    assert fuse_gelu_quant(d) == 0  # idempotent
    fused = [m for m in d.modules() if getattr(m, "_fused_gelu_quant", False)]
    assert {type(m).__name__ for m in fused} == {"FluxSingleTransformerBlock", "FeedForward"}


def test_a_changed_upstream_forward_fuses_nothing_and_says_so(monkeypatch):
    """The rebound forwards copy diffusers'; once an upstream forward's source changes (as a diffusers
    upgrade would change it) they must not replace its own."""
    import inspect

    from loguru import logger

    from app import upstream

    d = _flux_fp8()
    name = "diffusers.models.attention.FeedForward.forward"
    target, real = upstream.resolve(name), inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda o: real(o) + ("# edited upstream\n" if o is target else ""))
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        assert fuse_gelu_quant(d) == 0
    finally:
        logger.remove(sink)
    assert not any(getattr(m, "_fused_gelu_quant", False) for m in d.modules())
    assert any("the diffusers code it copies changed" in line and name in line for line in lines)


def test_nothing_is_rebound_without_fp8_linears_or_tanh_gelu():
    torch.manual_seed(0)
    bf16 = FLUX.build_tiny().transformer  # not quantized: plain nn.Linear
    assert fuse_gelu_quant(bf16) == 0
    sdxl = SDXL.build_tiny().unet  # FP8, but SDXL's feed-forwards are GEGLU
    quantize_denoiser(sdxl, "fp8", SDXL.skips)
    assert fuse_gelu_quant(sdxl) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rebound_forwards_compute_diffusers_blocks_up_to_activation_quantization(dtype):
    """On the CPU FP8Linear does not quantize activations; the fused forwards do (as on the GPU). So the
    two transformers differ by that quantization alone: a few percent, never zero, and an error in the
    rebound forwards (bias, gate, residual, concat order, text/image split) would be of order one."""
    plain = _flux_fp8(dtype)
    fused = copy.deepcopy(plain)
    assert fuse_gelu_quant(fused) > 0
    inputs = _inputs(plain)
    with torch.no_grad():
        want, got = plain(**inputs)[0], fused(**inputs)[0]
    assert got.shape == want.shape and got.dtype == want.dtype
    assert 1e-4 < _rel(got, want) < 0.05, _rel(got, want)


def test_a_single_block_alone_matches_with_text_and_image_split_back():
    plain = _flux_fp8()
    block = plain.single_transformer_blocks[0]
    fused = copy.deepcopy(block)
    fuse_gelu_quant(fused)
    g = torch.Generator().manual_seed(3)
    dim = block.proj_out.out_features
    img, txt, temb = torch.randn(1, 16, dim, generator=g), torch.randn(1, 4, dim, generator=g), torch.randn(1, dim, generator=g)
    rope = plain.pos_embed(torch.zeros(20, 3))
    with torch.no_grad():
        want = block(img, txt, temb, image_rotary_emb=rope)
        got = fused(img, txt, temb, image_rotary_emb=rope)
    assert [t.shape for t in got] == [(1, 4, dim), (1, 16, dim)]
    for w, h in zip(want, got):
        assert 1e-5 < _rel(h, w) < 0.05


def test_torch_compile_traces_the_fused_blocks_whole():
    """fullgraph=True: the op's fake implementation and the rebound forwards trace without a break."""
    d = _flux_fp8()
    fuse_gelu_quant(d)
    inputs = _inputs(d, tokens=16, text=4)
    with torch.no_grad():
        eager = d(**inputs)[0]
        d.compile_repeated_blocks(fullgraph=True, dynamic=False)
        compiled = d(**inputs)[0]
    assert _rel(compiled, eager) < 1e-5
