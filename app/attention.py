"""Choose the attention kernel on purpose, per GPU.

FLUX at 1024x1024 spends ~15 of its ~74 TFLOP per step in attention (4,608 tokens, 24 heads of
128). PyTorch's default SDPA on H100 is FlashAttention-2 (no Hopper wgmma/TMA); cuDNN's SDPA and
FlashAttention-3 use them. `fa3` needs the `fa3-fwd` wheel (forward-only FA3 build); when it is
missing or does not load, we fall back to cuDNN and say so.

`fa3_fp8` (opt-in) runs the same FA3 kernel on e4m3 Q/K/V with one scale per (batch, head) and K
centred over the sequence first (exact: without a mask, subtracting one vector from every key shifts
each query's logits by a constant, which softmax ignores; it removes the keys' shared offset, which
would otherwise spend the e4m3 range). The probabilities are rounded to e4m3 inside the kernel too.
Opt-in because random weights cannot show what real activations' outliers do to it.
"""

from __future__ import annotations

from loguru import logger

from app import upstream
from weights.fp8 import quantize_e4m3

# What _install_fa3 writes into (diffusers' private registry, and the backend function it replaces),
# fingerprinted as of diffusers 0.42.1: a changed registry gets cudnn, not a blind write.
WRITES_INTO = {
    "diffusers.models.attention_dispatch._AttentionBackendRegistry": "429e35052e1be969",
    "diffusers.models.attention_dispatch._flash_attention_3": "a11c16979edfe843",
}

BACKENDS = {"native": "native", "cudnn": "_native_cudnn", "flash": "_native_flash", "fa3": "_flash_3",
            "fa3_fp8": "_flash_3"}


def quantize_heads(t):
    """(e4m3 codes, fp32 descale [batch, heads]) of a [batch, seq, heads, dim] tensor, one scale per head."""
    codes, scale = quantize_e4m3(t, (1, 3))
    return codes, scale.flatten(1)


def fp8_inputs(query, key, value):
    """The centred, per-head quantized (q, k, v) and their descales, as `fa3_fp8` feeds the kernel."""
    key = key - key.mean(dim=1, keepdim=True)
    (q, qd), (k, kd), (v, vd) = (quantize_heads(t) for t in (query, key, value))
    return (q, k, v), (qd, kd, vd)


def run_fa3(flash_attn_func, query, key, value, scale=None, is_causal=False, fp8=False):
    """FA3 on [batch, seq, heads, dim] bf16 inputs, or on their e4m3 form (`fp8_inputs`) when `fp8`."""
    if fp8 and not is_causal:  # centring K is exact only without a mask or causality
        (q, k, v), (qd, kd, vd) = fp8_inputs(query, key, value)
        out = flash_attn_func(q, k, v, softmax_scale=scale, q_descale=qd, k_descale=kd, v_descale=vd)
    else:
        out = flash_attn_func(query, key, value, softmax_scale=scale, causal=is_causal)
    return out[0] if isinstance(out, tuple) else out


def _install_fa3(fp8: bool = False) -> bool:
    """Register fa3-fwd's kernel (bf16, or e4m3 when `fp8`) as diffusers' `_flash_3` backend; False when
    it cannot load."""
    try:
        from fa3_fwd_interface import flash_attn_func
    except Exception as e:  # missing wheel, or built against another torch ABI
        logger.warning("fa3 attention unavailable ({}: {}); using cudnn", type(e).__name__, str(e)[:120])
        return False
    stale = upstream.changed(WRITES_INTO)
    if stale:
        logger.warning("fa3 attention not installed: the diffusers code it writes into changed: {}; using cudnn",
                       ", ".join(stale))
        return False
    import diffusers.models.attention_dispatch as ad

    def fa3(query, key, value, attn_mask=None, scale=None, is_causal=False, return_lse=False, _parallel_config=None):
        if attn_mask is not None:
            raise ValueError("fa3 attention takes no mask")
        out = run_fa3(flash_attn_func, query, key, value, scale, is_causal, fp8)
        return (out, None) if return_lse else out

    # diffusers looks FA3 up under the official `flash_attn_interface` name; point its registry
    # entry at the fa3-fwd build instead.
    ad._AttentionBackendRegistry._backends[ad.AttentionBackendName._FLASH_3] = fa3
    ad._AttentionBackendRegistry._supported_arg_names[ad.AttentionBackendName._FLASH_3] = {
        "query", "key", "value", "attn_mask", "scale", "is_causal", "return_lse", "_parallel_config"}
    ad._CAN_USE_FLASH_ATTN_3 = True
    return True


def takes_backend(denoiser) -> bool:
    """Whether any attention processor of `denoiser` dispatches through diffusers' backend registry.

    FLUX's `FluxAttnProcessor` does; SDXL's UNet (diffusers 0.42.1) runs `AttnProcessor2_0`, which
    calls `F.scaled_dot_product_attention` itself: `set_attention_backend` changes nothing there but
    the process-wide default backend.
    """
    return any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in denoiser.modules())


def set_attention(denoiser, name: str) -> str:
    """Set `denoiser`'s attention backend (native|cudnn|flash|fa3|fa3_fp8); return the one actually used."""
    if name != "native" and not takes_backend(denoiser):
        logger.warning("{} has no backend-aware attention processors; {} not applied, PyTorch's SDPA stays",
                       type(denoiser).__name__, name)
        return "native"
    if name in ("fa3", "fa3_fp8") and not _install_fa3(fp8=name == "fa3_fp8"):
        name = "cudnn"
    if name != "native":
        denoiser.set_attention_backend(BACKENDS[name])
    return name
