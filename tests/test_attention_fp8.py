"""The math of `fa3_fp8` on the CPU: per-(batch, head) e4m3 quantization of Q/K/V, and centring K over
the sequence first. The FA3 kernel itself needs an H100; what it is fed is decided here, in plain torch.

Dequantization rule (what the kernel's q/k/v_descale mean): codes.float() * descale[:, None, :, None]
on the [batch, seq, heads, dim] layout diffusers hands its attention backends.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.attention import fp8_inputs, quantize_heads
from weights.fp8 import E4M3_MAX

FP8 = torch.float8_e4m3fn
B, S, H, D = 2, 64, 3, 32


def deq(codes, descale):
    return codes.float() * descale[:, None, :, None]


def sdpa(q, k, v):
    """SDPA on [batch, seq, heads, dim] (torch's layout is [batch, heads, seq, dim])."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def qkv(seed, offset=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, S, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    return q.to(dtype), (k + offset).to(dtype), v.to(dtype)


# ---- quantize_heads ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_heads_gives_each_head_the_full_e4m3_range(dtype):
    """Heads six orders of magnitude apart each use the whole range: a per-tensor scale would flush the
    small head to zero and fail both the amax and the element bound below."""
    g = torch.Generator().manual_seed(0)
    mags = torch.tensor([1e-3, 1.0, 1e3]).view(1, 1, H, 1)
    t = (torch.randn(B, S, H, D, generator=g) * mags).to(dtype)
    codes, descale = quantize_heads(t)
    assert codes.dtype == FP8 and codes.shape == t.shape
    assert descale.dtype == torch.float32 and descale.shape == (B, H)
    # Each (batch, head)'s largest value maps to the largest e4m3 code.
    assert torch.equal(codes.float().abs().amax(dim=(1, 3)), torch.full((B, H), E4M3_MAX))
    torch.testing.assert_close(descale, t.float().abs().amax(dim=(1, 3)) / E4M3_MAX, rtol=0, atol=0)
    x, ref = deq(codes, descale), t.float()
    # Round to nearest with 3 mantissa bits: within 2^-4 relative for normals; below 2^-6 (subnormal
    # codes) the step is 2^-9, so within 2^-10 code units (times the head's descale).
    bound = ref.abs() * 2**-4 + descale[:, None, :, None] * 2**-10
    assert ((x - ref).abs() <= bound * 1.0001).all()
    for h in range(H):  # and the head-wise L2 error is e4m3's ~2-3%, not a wrong scale's
        assert rel(x[:, :, h], ref[:, :, h]) < 0.05, h


def test_a_head_of_zeros_quantizes_to_zeros_not_nan():
    """An all-zero head has amax 0: without the scale's floor, 0 / 0 would put NaN codes in the kernel."""
    t = torch.randn(B, S, H, D)
    t[1, :, 2] = 0
    codes, descale = quantize_heads(t)
    x = deq(codes, descale)
    assert torch.isfinite(descale).all() and (descale > 0).all()
    assert torch.isfinite(codes.float()).all() and torch.isfinite(x).all()
    assert (x[1, :, 2] == 0).all()
    # The other heads are untouched by the zero one.
    assert torch.equal(codes.float().abs().amax(dim=(1, 3))[0], torch.full((H,), E4M3_MAX))


# ---- centring K -------------------------------------------------------------------------------------

def test_centring_k_over_the_sequence_leaves_attention_unchanged():
    """Without a mask, subtracting one vector m from every key adds -q.m to all of a query's logits,
    which softmax ignores. It has to be the mean over the sequence (dim 1): one vector per (batch, head)
    shared by all keys; a per-key shift (mean over dim) is not exact, and neither is centring Q."""
    q, k, v = qkv(0, dtype=torch.float64)
    k = k + 40.0 * torch.randn(1, 1, H, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = sdpa(q, k, v)
    torch.testing.assert_close(sdpa(q, k - k.mean(dim=1, keepdim=True), v), ref, rtol=0, atol=1e-10)
    assert (sdpa(q, k - k.mean(dim=3, keepdim=True), v) - ref).abs().max() > 1e-3
    assert (sdpa(q - q.mean(dim=1, keepdim=True), k, v) - ref).abs().max() > 1e-3


def test_fp8_inputs_centres_k_only_and_quantizes_per_head():
    q, k, v = qkv(2, offset=20.0)
    (qc, kc, vc), (qd, kd, vd) = fp8_inputs(q, k, v)
    # Q and V go in as they are (centring either would change the output).
    for (c, d), t in (((qc, qd), q), ((vc, vd), v)):
        c2, d2 = quantize_heads(t)
        assert torch.equal(c.view(torch.uint8), c2.view(torch.uint8)) and torch.equal(d, d2)
    # K is centred: the +20 offset is gone from the codes' scale and from their per-channel means.
    assert kc.dtype == FP8 and kd.shape == (B, H)
    assert (kd < 5.0 / E4M3_MAX).all(), kd  # centred N(0, 1) keys: amax ~3-4; with the offset it would be ~24
    torch.testing.assert_close(deq(kc, kd), k - k.mean(dim=1, keepdim=True), rtol=2**-4, atol=kd.max().item())


# Measured (seeds 0-4, offset +20, [2, 64, 3, 32]): centred 0.044-0.046 relative L2 error of the
# dequantized attention output against float; K quantized without centring 0.44-0.48 (10x worse).
CENTRED_REL_ERR = 0.1
CENTRING_GAIN = 3.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_centring_k_keeps_fp8_attention_close_to_float(seed):
    """A shared offset on every key (as real K activations carry) spends e4m3's range on the offset: the
    keys' differences, all softmax sees, round away. Centring first removes it exactly."""
    q, k, v = qkv(seed, offset=20.0)
    ref = sdpa(q, k, v)
    (qc, kc, vc), (qd, kd, vd) = fp8_inputs(q, k, v)
    centred = rel(sdpa(deq(qc, qd), deq(kc, kd), deq(vc, vd)), ref)
    kc_raw, kd_raw = quantize_heads(k)
    uncentred = rel(sdpa(deq(qc, qd), deq(kc_raw, kd_raw), deq(vc, vd)), ref)
    assert 1e-3 < centred < CENTRED_REL_ERR, centred  # quantized (not a copy), and close
    assert uncentred > CENTRING_GAIN * centred, (centred, uncentred)
