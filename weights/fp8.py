"""FP8 linear layers as plain modules: an e4m3 weight, a per-output-row scale, `torch._scaled_mm`.

Why not torchao's Float8 tensor subclass: dynamo traces through its subclass weights on every block
(224 s of regional compile for 6 FLUX blocks against 2.1 s here, bench/results/probe_h100_1.json).
Plain buffers compile like any module, serialize as plain safetensors tensors (bake once, load on
the meta device with `assign=True`), and run the same cuBLAS row-wise FP8 GEMM. The activation is
quantized per row at run time; under torch.compile the amax, divide and cast fuse into its producer.

Numerics: weight scale = row amax / 448, weight = round_e4m3(w / scale), so the dequantized weight
is `weight.float() * weight_scale` (the same rule as ComfyUI / compressed-tensors per-channel).

Everything here also works on the meta device: the loader builds a baked denoiser's skeleton on
meta, swaps its linears with `swap_linears` exactly as the bake did, then assigns the stored tensors.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3_MAX = 448.0
E4M3 = torch.float8_e4m3fn  # the dtype of every stored and run-time FP8 code here
# Every 8-bit float dtype this torch knows (e4m3fn, e5m2, their fnuz variants, e8m0fnu, any later one):
# raw codes of any of them must never be cast to numbers without their format's rule.
FLOAT8 = tuple(getattr(torch, n) for n in sorted(dir(torch)) if n.startswith("float8_")
               and isinstance(getattr(torch, n), torch.dtype))
# torch._scaled_mm (cuBLASLt FP8) requires K and N to be multiples of 16; other linears stay as they are.
ALIGN = 16


def quantize_e4m3(t: torch.Tensor, dim) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, fp32 scales) of `t` with one scale per slice reduced over `dim` (kept, size 1):
    scale = amax / 448, codes = round_e4m3(t / scale). The amax is exact in any float dtype, so the
    same input gives the same bytes on a CPU and a GPU. Under torch.compile the amax, divide and cast
    fuse into the producer of `t`."""
    scale = (t.abs().amax(dim=dim, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def fits_scaled_mm(lin: nn.Linear) -> bool:
    """Whether `torch._scaled_mm` can run this linear (in_features and out_features multiples of 16)."""
    return lin.in_features % ALIGN == 0 and lin.out_features % ALIGN == 0


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes [N, K], fp32 scales [N, 1]), one scale per row: a weight's output rows (the bake)
    or an activation's tokens (FP8Linear at run time)."""
    return quantize_e4m3(w, 1)


class FP8Linear(nn.Module):
    """Drop-in for nn.Linear at inference: y = x W^T + b with W in FP8 (row-wise scaled)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 out_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.out_dtype = in_features, out_features, out_dtype
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=E4M3, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=out_dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "FP8Linear":
        """Quantize an existing nn.Linear (its dtype becomes the output dtype)."""
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device="meta", out_dtype=lin.weight.dtype)
        if not lin.weight.is_meta:  # a meta skeleton (the baked loader) needs shapes only; 0.8 s on FLUX
            q.weight, q.weight_scale = quantize_rows(lin.weight.data)
        q.bias = None if lin.bias is None else lin.bias.data
        return q

    CODES = ("weight", "weight_scale")  # buffers a dtype cast moves but never converts (see _apply)

    def _apply(self, fn, recurse=True):
        """`module.to(dtype)` / `.half()` must move the codes and scales, never cast them: float8 counts
        as a floating dtype, so a pipeline-wide `.to(torch.bfloat16)` would otherwise turn the codes into
        numbers (noise) and round the fp32 scales. The output dtype follows the cast."""
        kept = {n: getattr(self, n) for n in self.CODES}
        super()._apply(fn, recurse)
        for n, old in kept.items():
            new = getattr(self, n)
            if new.dtype != old.dtype:
                setattr(self, n, old.to(new.device))
        self.out_dtype = self.bias.dtype if self.bias is not None else fn(torch.empty(0, dtype=self.out_dtype)).dtype
        return self

    def dequantized_weight(self) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(self.out_dtype)

    def forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """y = x W^T (+ b unless `bias` is False: app.fused adds it inside its GELU kernel instead)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.device.type != "cuda":  # reference path (CPU tests): same weights, no FP8 GEMM
            y = x2.to(self.out_dtype) @ self.dequantized_weight().t()
            y = y if self.bias is None or not bias else y + self.bias
        else:
            y = self.mm(*quantize_rows(x2), bias=bias)
        return y.reshape(*shape[:-1], self.out_features)

    def mm(self, xq: torch.Tensor, sx: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The GEMM on an activation already quantized per row (e4m3 codes [M, K], fp32 scales [M, 1])."""
        if xq.device.type != "cuda":  # reference path: dequantize, then the same matmul as forward's
            y = (xq.float() * sx).to(self.out_dtype) @ self.dequantized_weight().t()
        else:
            # Fast accumulation is 5-15% faster; a bias in the epilogue costs 10-15% while the same add
            # fuses into the next kernel under torch.compile (bench/results/gemm_h100.json). cuBLAS, not
            # MSLK's CUTLASS kernel: 2.8% slower per step (gemm_h200.json, variants_h200_s3.json).
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.weight_scale.t(),
                                 out_dtype=self.out_dtype, use_fast_accum=True)
        return y if self.bias is None or not bias else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def swap_linears(module: nn.Module, keep, make=FP8Linear.from_linear) -> list[str]:
    """Replace every nn.Linear under `module` that `keep(name)` rejects and `fits_scaled_mm`; return swapped names.

    Idempotent: an FP8Linear is not an nn.Linear, so a second call swaps nothing and returns [].
    Modules are replaced one at a time so the bf16 weight of each is freed as its FP8 copy appears:
    peak memory stays near the bf16 size instead of bf16 + FP8.
    """
    swapped = []
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear) and fits_scaled_mm(child) and not keep(name):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, make(child))
            swapped.append(name)
    return swapped
