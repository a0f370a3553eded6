"""The denoiser's quantization step, shared by `bake` and the runtime recipe (app/optimize.py).

Order matters and is fixed here: fuse QKV first, then quantize. Quantizing first breaks the fusion
in torchao 0.18 (`'Parameter' object has no attribute 'tensor_data_names'`, see ANCHORS.md).
After fusing we drop the unfused copies (to_q/to_k/to_v, add_*_proj) that diffusers keeps around:
the fused forward never reads them, and on FLUX.1-dev they are 2.1 B parameters (4.3 GB in bf16).

Which linears are quantized: every `nn.Linear` of the denoiser whose qualified name the family does
not skip (`Family.skips`: embedders, final projection, norm/modulation layers stay bf16) and whose
dimensions are multiples of 16 (torchao's `_scaled_mm` requirement; it skips the others itself).
"""

from __future__ import annotations

import torch
from loguru import logger
from torch import nn

from app.families import Family

# Attention projections made redundant by each fused projection (diffusers' fuse_projections).
_FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
          "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def quant_config(precision: str):
    """The torchao config for `precision` (fp8 | int8), or None for bf16/fp32 (no quantization)."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Int8DynamicActivationInt8WeightConfig, PerRow)

    if precision == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if precision == "int8":
        return Int8DynamicActivationInt8WeightConfig()
    if precision in ("bf16", "fp32"):
        return None
    raise ValueError(f"unknown precision {precision!r} (fp8, int8 or bf16)")


def is_quantized(tensor) -> bool:
    """True for a torchao quantized tensor subclass (Float8Tensor, Int8Tensor, ...)."""
    from torchao.utils import TorchAOBaseTensor

    return isinstance(tensor, TorchAOBaseTensor)


@torch.no_grad()
def fuse_qkv(denoiser: nn.Module) -> int:
    """Fuse the attention projections (idempotent) and drop the unfused copies; return modules fused.

    Works on the meta device too, which is how the loader rebuilds a baked skeleton.
    """
    if not hasattr(denoiser, "fuse_qkv_projections"):
        return 0
    denoiser.fuse_qkv_projections()
    fused = 0
    for module in denoiser.modules():
        if not getattr(module, "fused_projections", False):
            continue
        for fused_name, originals in _FUSED.items():
            if isinstance(getattr(module, fused_name, None), nn.Module):
                for name in originals:
                    if name in module._modules:
                        del module._modules[name]
                fused += 1
    return fused


def quantizable(name: str, module: nn.Module, family: Family) -> bool:
    """Whether the recipe quantizes denoiser module `name`."""
    if not isinstance(module, nn.Linear) or family.skips(name) or is_quantized(module.weight):
        return False
    out_f, in_f = module.weight.shape
    return out_f % 16 == 0 and in_f % 16 == 0


@torch.no_grad()
def quantize_denoiser(denoiser: nn.Module, family: Family, precision: str) -> list[str]:
    """Fuse QKV, then quantize the denoiser's block linears in place; return the quantized names.

    Idempotent: a baked (already quantized) denoiser comes back unchanged, so the runtime recipe can
    call this on every load. bf16/fp32 only fuses. On CUDA this is torchao's `quantize_`; on a CPU
    (baking on a build machine without a GPU) torchao refuses FP8 (`_check_hardware_support`), so we
    build the same `Float8Tensor` with the same config fields (`_fp8_from_config`); the GPU bench
    checks that the two give identical bytes.
    """
    fuse_qkv(denoiser)
    config = quant_config(precision)
    if config is None:
        return []
    names = [n for n, m in denoiser.named_modules() if quantizable(n, m, family)]
    chosen = set(names)
    device = next(denoiser.parameters()).device
    if precision == "fp8" and device.type != "cuda":
        modules = dict(denoiser.named_modules())
        for n in names:
            lin = modules[n]
            lin.weight = nn.Parameter(_fp8_from_config(lin.weight.detach(), config), requires_grad=False)
    else:
        from torchao.quantization import quantize_

        quantize_(denoiser, config, filter_fn=lambda m, fqn: fqn in chosen)
    done = [n for n, m in denoiser.named_modules() if n in chosen and is_quantized(m.weight)]
    logger.info("quantized {} of the denoiser's linears to {} ({} kept in high precision by the skip list)",
                len(done), precision, sum(1 for n, m in denoiser.named_modules()
                                          if isinstance(m, nn.Linear) and family.skips(n)))
    return done


def _act_kwargs(config):
    from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs

    act_granularity = config.granularity[0]
    return QuantizeTensorToFloat8Kwargs(config.activation_dtype, act_granularity,
                                        hp_value_lb=config.activation_value_lb,
                                        hp_value_ub=config.activation_value_ub,
                                        kernel_preference=config.kernel_preference)


def _fp8_from_config(weight: torch.Tensor, config):
    """torchao's own FP8 weight transform (Float8Tensor.from_hp) without its hardware assertion."""
    from torchao.quantization import Float8Tensor

    return Float8Tensor.from_hp(weight.to(torch.bfloat16), float8_dtype=config.weight_dtype,
                                granularity=config.granularity[1], mm_config=config.mm_config,
                                kernel_preference=config.kernel_preference, act_quant_kwargs=_act_kwargs(config))


def fp8_weight(codes: torch.Tensor, row_scale: torch.Tensor, dtype=torch.bfloat16):
    """A per-row Float8Tensor from existing FP8 codes and `[out, 1]` scales, exactly as the recipe's.

    Used by the importer: the published codes are kept bit for bit (no re-quantization), with
    dequantized weight = codes x scale.
    """
    from torchao.quantization import Float8Tensor

    config = quant_config("fp8")
    if codes.dtype != torch.float8_e4m3fn:
        raise TypeError(f"FP8 codes must be float8_e4m3fn, got {codes.dtype}")
    out_f, in_f = codes.shape
    if tuple(row_scale.shape) != (out_f, 1):
        raise ValueError(f"row scale shape {tuple(row_scale.shape)} does not fit weight {(out_f, in_f)}")
    return Float8Tensor(codes, row_scale.to(torch.float32), block_size=[1, in_f], mm_config=config.mm_config,
                        act_quant_kwargs=_act_kwargs(config), kernel_preference=config.kernel_preference,
                        dtype=dtype)
