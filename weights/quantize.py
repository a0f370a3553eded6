"""The one quantization step of the project: fuse Q/K/V, then FP8 (or INT8) on the denoiser's linears.

The runtime recipe (app.optimize), `weights bake` (before writing) and the baked loader (on the meta
skeleton, so its modules match the stored tensors) all call `quantize_denoiser`; the importer uses
`FUSED` to concatenate a checkpoint's q/k/v the way `fuse_qkv` lays them out. Which layers stay in
high precision is the caller's `skip(name)` (a family's skip list, or the one a manifest recorded).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

from weights.fp8 import fits_scaled_mm, swap_linears

# Projections made redundant by each fused one (diffusers' `fuse_projections`): self-attention gets
# `to_qkv`, cross-attention (SDXL, Wan) only `to_kv` (its `to_q` stays in use), FLUX's text stream
# `to_added_qkv`, Wan I2V's image keys/values `to_added_kv`.
FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
         "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"), "to_added_kv": ("add_k_proj", "add_v_proj")}

PRECISIONS = ("fp8", "int8", "bf16", "fp32", "none")


def skip_patterns(patterns: Iterable[str]) -> Callable[[str], bool]:
    """`skip(name)`: True when a module's qualified name fully matches one of the regexes."""
    compiled = [re.compile(p) for p in patterns]
    return lambda name: any(p.fullmatch(name) for p in compiled)


@torch.no_grad()
def fuse_qkv(denoiser) -> int:
    """Fuse Q/K/V (and the text stream's) projections; drop the unfused copies; return params freed.

    diffusers' `fuse_qkv_projections()` keeps `to_q`, `to_k`, `to_v`, ... alive though they are never
    used again: 2.15 B parameters (4.3 GB of bf16) on FLUX.1-dev. Idempotent; works on the meta device.
    """
    if not hasattr(denoiser, "fuse_qkv_projections") or \
            any(getattr(m, "fused_projections", False) for m in denoiser.modules()):
        return 0
    denoiser.fuse_qkv_projections()
    freed = 0
    for module in denoiser.modules():
        if not getattr(module, "fused_projections", False):
            continue
        for fused, originals in FUSED.items():
            if isinstance(getattr(module, fused, None), torch.nn.Module):
                for name in originals:
                    if isinstance(module._modules.get(name), torch.nn.Module):
                        freed += sum(p.numel() for p in module._modules[name].parameters())
                        del module._modules[name]
    return freed


def is_torchao(tensor) -> bool:
    """Whether a weight is already one of torchao's quantized tensor subclasses."""
    return type(tensor).__module__.startswith("torchao")


@torch.no_grad()
def quantize_denoiser(denoiser, precision: str, skip: Callable[[str], bool], fuse: bool = True) -> list[str]:
    """Fuse QKV (unless `fuse` is False: a model whose attention processor reads only the unfused
    projections, such as Qwen-Image's), then quantize every `nn.Linear` that `skip` keeps and `fits_scaled_mm`; return their names.

      fp8   `weights.fp8.FP8Linear` (row-wise e4m3 weight + fp32 scale, `torch._scaled_mm`)
      int8  torchao's Int8DynamicActivationInt8WeightConfig (sm_80/86, where FP8 has no kernel)
      bf16/fp32/none  fuse only
    Idempotent: an already quantized denoiser returns [] and is left unchanged.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    if fuse:
        fuse_qkv(denoiser)
    if precision == "fp8":
        return swap_linears(denoiser, keep=skip)
    if precision == "int8":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        chosen = {n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear) and fits_scaled_mm(m)
                  and not skip(n) and not is_torchao(m.weight)}
        if chosen:
            quantize_(denoiser, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: fqn in chosen)
        return sorted(chosen)
    return []


# Text-encoder linears kept in high precision whatever their place: T5's feed-forward output `wo`, whose
# input transformers casts to the weight's dtype (an FP8 weight would turn the activation into raw e4m3
# codes; transformers keeps `wo` in fp32 under fp16 for its overflow).
TEXT_KEEP = (r".*\.wo",)


def encoder_linears(encoder, keep=TEXT_KEEP) -> list[str]:
    """Names of the linears inside a text encoder's repeated layers (its `nn.ModuleList`s) that FP8 may
    take. Embeddings, norms, a final projection (CLIP's `text_projection`), anything outside the
    repeated layers and `keep`'s patterns stay in high precision: few FLOPs, and where the output's
    scale is set."""
    lists = [n for n, m in encoder.named_modules() if isinstance(m, torch.nn.ModuleList)]
    kept = skip_patterns(keep)
    return [n for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear) and fits_scaled_mm(m)
            and any(n.startswith(f"{p}.") for p in lists) and not kept(n)]


@torch.no_grad()
def quantize_text_encoder(encoder, precision: str = "fp8") -> list[str]:
    """FP8Linear (the denoiser's row-wise e4m3 machinery) on a text encoder's repeated-layer linears
    (`encoder_linears`); return their names. Idempotent; `bf16`/`none` changes nothing."""
    if precision not in ("fp8", "bf16", "none"):
        raise ValueError(f"text encoders run fp8 or bf16, not {precision!r}")
    if precision != "fp8":
        return []
    chosen = set(encoder_linears(encoder))
    return swap_linears(encoder, keep=lambda name: name not in chosen)
