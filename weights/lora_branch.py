"""Per-request LoRA beside the denoiser's linears: y = W x + B (A x), with A and B buffers of a fixed size.

`add_branches(denoiser, rank)` gives every linear of the denoiser (FP8Linear and nn.Linear alike, the
skip list's bf16 layers included) a low-rank branch whose buffers are preallocated at `rank` (times the
pieces of a fused projection: `to_qkv` holds q, k and v side by side) and start at zero. A job's LoRA is
then written into those same tensors in place (`Branch.write`, `Branch.clear`): a compiled graph, or a
CUDA graph, keeps reading the tensors it was built on, so switching LoRA never recompiles and nothing
of the base weights is dequantized or touched. A lower rank uses the first columns; the rest of B stays
zero, so stale rows of A never reach the output.

On FP8Linear the A product runs as a second row-scaled FP8 GEMM on the activation the main GEMM already
quantized (app.fused hands `mm` that activation only): A is stored as e4m3 codes with one scale per
rank row, B in the output dtype, and `addmm` adds B's product to the main output in cuBLAS's epilogue.
On a CPU the same numbers run through the dequantized reference path, like FP8Linear's own.
"""

from __future__ import annotations

import torch
from torch import nn

from weights.fp8 import E4M3, FP8Linear, quantize_rows
from weights.quantize import FUSED

ALIGN = 16  # torch._scaled_mm: the rank (A's rows) must be a multiple of 16


class Branch:
    """What both branch classes add: `lora_pieces` (1, or the projections fused into this one), the
    capacity (rank x pieces) and the in-place writes."""

    lora_pieces: int

    @property
    def lora_capacity(self) -> int:
        return self.lora_B.shape[1]

    @torch.no_grad()
    def clear(self) -> None:
        """No LoRA: B's zeros make the branch add exactly 0 (whatever A still holds)."""
        self.lora_B.zero_()

    @torch.no_grad()
    def write(self, parts: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Overwrite the branch with `parts`, each (first output row, A [r, in], B [rows, r]) with its scale
        already in B; their ranks are stacked side by side (a fused projection's q, k and v pieces each
        own their rows of B: block-diagonal). The caller keeps the total rank within `lora_capacity`."""
        self.lora_B.zero_()
        at = 0
        for row, a, b in parts:
            r = a.shape[0]
            self._write_a(at, a)
            self.lora_B[row:row + b.shape[0], at:at + r] = b.to(self.lora_B.device, self.lora_B.dtype)
            at += r

    def _branch(self, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        return torch.addmm(y2, x2 @ self.lora_A.t(), self.lora_B.t())


class LoRALinear(Branch, nn.Linear):
    """nn.Linear (bf16 layers: the skip list's, or an unquantized model's) with a branch in its dtype."""

    def _init_branch(self, capacity: int) -> None:
        w = self.weight
        dt = w.dtype if w.dtype.is_floating_point and w.element_size() >= 2 else torch.bfloat16
        self.register_buffer("lora_A", torch.zeros(capacity, self.in_features, dtype=dt, device=w.device))
        self.register_buffer("lora_B", torch.zeros(self.out_features, capacity, dtype=dt, device=w.device))

    def _write_a(self, at: int, a: torch.Tensor) -> None:
        self.lora_A[at:at + a.shape[0]] = a.to(self.lora_A.device, self.lora_A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        shape = y.shape
        x2 = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
        return self._branch(x2, y.reshape(-1, shape[-1]).to(self.lora_B.dtype)).to(y.dtype).reshape(shape)


class LoRAFP8Linear(Branch, FP8Linear):
    """FP8Linear whose branch reuses the main GEMM's quantized activation: A in e4m3 (row-scaled)."""

    CODES = FP8Linear.CODES + ("lora_A", "lora_A_scale")

    def _init_branch(self, capacity: int) -> None:
        dev = self.weight.device
        self.register_buffer("lora_A", torch.zeros(capacity, self.in_features, dtype=E4M3, device=dev))
        self.register_buffer("lora_A_scale", torch.ones(capacity, 1, dtype=torch.float32, device=dev))
        self.register_buffer("lora_B", torch.zeros(self.out_features, capacity, dtype=self.out_dtype, device=dev))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.lora_B.dtype != self.out_dtype:  # B follows the output dtype, like the bias
            self.lora_B = self.lora_B.to(self.out_dtype)
        return self

    def _write_a(self, at: int, a: torch.Tensor) -> None:
        codes, scale = quantize_rows(a.to(self.lora_A.device, torch.float32))
        self.lora_A[at:at + a.shape[0]] = codes
        self.lora_A_scale[at:at + a.shape[0]] = scale

    def forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.device.type != "cuda":  # reference path: FP8Linear's, with the dequantized A
            y = x2.to(self.out_dtype) @ self.dequantized_weight().t()
            y = torch.addmm(y, x2.to(self.out_dtype) @ self._a().t(), self.lora_B.t())
            y = y if self.bias is None or not bias else y + self.bias
        else:
            y = self.mm(*quantize_rows(x2), bias=bias)
        return y.reshape(*shape[:-1], self.out_features)

    def mm(self, xq: torch.Tensor, sx: torch.Tensor, bias: bool = True) -> torch.Tensor:
        if xq.device.type != "cuda":
            xd = (xq.float() * sx).to(self.out_dtype)
            y = torch.addmm(xd @ self.dequantized_weight().t(), xd @ self._a().t(), self.lora_B.t())
        else:
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.weight_scale.t(),
                                 out_dtype=self.out_dtype, use_fast_accum=True)
            xa = torch._scaled_mm(xq, self.lora_A.t(), scale_a=sx, scale_b=self.lora_A_scale.t(),
                                  out_dtype=self.out_dtype, use_fast_accum=True)
            y = torch.addmm(y, xa, self.lora_B.t())
        return y if self.bias is None or not bias else y + self.bias

    def _a(self) -> torch.Tensor:
        return (self.lora_A.float() * self.lora_A_scale).to(self.out_dtype)


def pieces(name: str) -> int:
    """How many projections a linear holds side by side: 3 for `to_qkv`, 2 for `to_kv`, else 1."""
    return len(FUSED.get(name.rpartition(".")[2], ("",)))


def add_branches(denoiser: nn.Module, rank: int) -> int:
    """Give every linear under `denoiser` a zero branch of capacity rank x pieces; return how many.
    Idempotent (a linear that has one keeps it)."""
    if rank <= 0 or rank % ALIGN:
        raise ValueError(f"LoRA rank must be a positive multiple of {ALIGN}, not {rank}")
    done = 0
    for name, m in denoiser.named_modules():
        if isinstance(m, Branch) or type(m) not in (nn.Linear, FP8Linear):
            continue
        m.__class__ = LoRAFP8Linear if isinstance(m, FP8Linear) else LoRALinear
        m.lora_pieces = pieces(name)
        m._init_branch(rank * m.lora_pieces)
        done += 1
    return done


def unwrap(denoiser: nn.Module) -> nn.Module:
    """The module inside a compiled or graphed wrapper (the one whose names a LoRA uses)."""
    while type(denoiser).__name__ in WRAPPERS:
        denoiser = getattr(denoiser, WRAPPERS[type(denoiser).__name__])
    return denoiser


def branches(denoiser: nn.Module) -> dict[str, Branch]:
    """The branch-carrying linears by qualified name."""
    return {n: m for n, m in unwrap(denoiser).named_modules() if isinstance(m, Branch)}


# torch.compile's whole-module wrapper, app.cudagraphs' replayer: the attribute holding the real module
WRAPPERS = {"OptimizedModule": "_orig_mod", "GraphedDenoiser": "module"}
