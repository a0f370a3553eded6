"""One pass from FLUX's MLP GEMM output to the next FP8 GEMM's input: bias + tanh-GELU (+ the single
blocks' concatenation with the attention output) + per-row e4m3 quantization, in one Triton kernel.

Why: under torch.compile these ops fuse with FP8Linear's row quantizer into one Inductor reduction that
stores the row and reads it back between its amax loop and its cast loop: about 2.5x what its bytes
need (bench/results/quant_kernel_h200.json). Here each program holds one whole row in registers: the
GEMM output is read once and the codes written once.

`fuse_gelu_quant(denoiser)` rebinds the forward of FLUX's single blocks and GELU feed-forwards whose
linears are FP8Linear; the new forwards compute what the diffusers forwards in `COPIED` do, with the
fused op in the middle. When an upstream source no longer matches its fingerprint (app.upstream) it
fuses nothing and says so. On a CPU the op runs its torch reference (`gelu_quant_reference`), so the
same forwards are tested there; on CUDA the Triton kernel, checked against the reference by
tests/test_fused_gpu.py (`pytest -m gpu`) and `python -m bench quant`.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from loguru import logger

from app import upstream
from weights.fp8 import E4M3, FP8Linear, quantize_rows

# The diffusers sources _single_block_forward and _feed_forward copy (diffusers 0.42.1), fingerprinted.
COPIED = {
    "diffusers.models.transformers.transformer_flux.FluxSingleTransformerBlock.forward": "57350a6dab842b40",
    "diffusers.models.attention.FeedForward.forward": "dae2c9f53987c25a",
}

NUM_WARPS = 32  # one row per program; H200: 109 us at 32 warps, 110 at 8, 157 at 4 (bench quant)


def gelu_quant_reference(prefix: torch.Tensor | None, h: torch.Tensor, bias: torch.Tensor):
    """(e4m3 codes [M, A+H], fp32 scales [M, 1]) of cat(prefix, gelu_tanh(h + bias)), one scale per row:
    the ops diffusers runs, then FP8Linear's quantizer (weights.fp8.quantize_rows)."""
    x = F.gelu(h + bias, approximate="tanh")
    return quantize_rows(x if prefix is None else torch.cat([prefix, x], dim=-1))


try:  # CUDA images carry Triton (torch's CUDA wheels depend on it); the CPU test image does not
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _gelu_quant_kernel(a_ptr, h_ptr, b_ptr, q_ptr, s_ptr, A, H, BLOCK_A: tl.constexpr, BLOCK_H: tl.constexpr,
                           HAS_A: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        oh = tl.arange(0, BLOCK_H)
        mh = oh < H
        x = tl.load(h_ptr + row * H + oh, mask=mh, other=0.0).to(tl.float32)
        x = x + tl.load(b_ptr + oh, mask=mh, other=0.0).to(tl.float32)
        x = x.to(tl.bfloat16).to(tl.float32)  # eager rounds h + bias to bf16 before the GELU...
        # 0.5 x (1 + tanh(y)) written as x * sigmoid(2y): one exp (and Triton's interpreter has no tanh)
        g = x / (1.0 + tl.exp(-1.5957691216057308 * (x + 0.044715 * x * x * x)))
        g = g.to(tl.bfloat16).to(tl.float32)  # ...and the GELU's output
        amax = tl.max(tl.where(mh, tl.abs(g), 0.0), axis=0)
        n = H
        if HAS_A:
            oa = tl.arange(0, BLOCK_A)
            ma = oa < A
            a = tl.load(a_ptr + row * A + oa, mask=ma, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(a), axis=0))
            n = A + H
        s = tl.maximum(amax / 448.0, 1e-12)
        tl.store(s_ptr + row, s)
        out = q_ptr + row * n
        if HAS_A:
            tl.store(out + oa, tl.clamp(a / s, -448.0, 448.0).to(tl.float8e4nv), mask=ma)
            out = out + A
        tl.store(out + oh, tl.clamp(g / s, -448.0, 448.0).to(tl.float8e4nv), mask=mh)


def gelu_quant_triton(prefix, h, bias, num_warps: int | None = None):
    """Launch the kernel: one program per row (on CUDA; also under TRITON_INTERPRET=1 on a CPU)."""
    h, bias = h.contiguous(), bias.contiguous()
    m, width = h.shape
    a = 0 if prefix is None else prefix.shape[1]
    prefix = h if prefix is None else prefix.contiguous()  # unused when there is none (HAS_A False)
    q = torch.empty((m, a + width), device=h.device, dtype=E4M3)
    s = torch.empty((m, 1), device=h.device, dtype=torch.float32)
    _gelu_quant_kernel[(m,)](prefix, h, bias, q, s, a, width, BLOCK_A=triton.next_power_of_2(max(a, 1)),
                             BLOCK_H=triton.next_power_of_2(width), HAS_A=a > 0,
                             num_warps=num_warps or NUM_WARPS)
    return q, s


@torch.library.custom_op("diffusion_worker::gelu_quant", mutates_args=())
def gelu_quant(prefix: torch.Tensor | None, h: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cat(prefix, gelu_tanh(h + bias)) quantized per row to e4m3: (codes, fp32 scales [M, 1])."""
    if h.is_cuda:
        return gelu_quant_triton(prefix, h, bias)
    return gelu_quant_reference(prefix, h, bias)


@gelu_quant.register_fake
def _(prefix, h, bias):
    width = h.shape[1] + (0 if prefix is None else prefix.shape[1])
    return h.new_empty((h.shape[0], width), dtype=E4M3), h.new_empty((h.shape[0], 1), dtype=torch.float32)


def _single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                          joint_attention_kwargs=None):
    """FluxSingleTransformerBlock.forward (COPIED) with bias+GELU+concat+quantize fused."""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    mlp = self.proj_mlp(norm_hidden_states, bias=False)
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
    b, n, _ = attn_output.shape
    xq, sx = gelu_quant(attn_output.reshape(b * n, -1), mlp.reshape(b * n, -1), self.proj_mlp.bias)
    hidden_states = residual + gate.unsqueeze(1) * self.proj_out.mm(xq, sx).reshape(b, n, -1)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def _feed_forward(self, hidden_states, *args, **kwargs):
    """FeedForward.forward for [GELU(tanh), Dropout..., FP8Linear]: the dropouts are identities at inference."""
    proj, out = self.net[0].proj, self.net[self._fused_out]
    h = proj(hidden_states, bias=False)
    shape = h.shape
    xq, sx = gelu_quant(None, h.reshape(-1, shape[-1]), proj.bias)
    return out.mm(xq, sx).reshape(*shape[:-1], out.out_features)


def _is_fp8(m) -> bool:
    return isinstance(m, FP8Linear) and m.bias is not None


def _single_fits(block) -> bool:
    act = getattr(block, "act_mlp", None)
    return (type(block).__name__ == "FluxSingleTransformerBlock" and isinstance(act, torch.nn.GELU)
            and act.approximate == "tanh" and _is_fp8(block.proj_mlp) and isinstance(block.proj_out, FP8Linear))


def _ff_out(ff) -> int | None:
    """Index of the output linear of a [GELU(tanh) with FP8 proj, Dropout..., FP8Linear, Dropout...] net."""
    net = getattr(ff, "net", None)
    if type(ff).__name__ != "FeedForward" or net is None or len(net) < 2:
        return None
    first = net[0]
    if type(first).__name__ != "GELU" or getattr(first, "approximate", None) != "tanh" or not _is_fp8(first.proj):
        return None
    linears = [i for i, m in enumerate(net) if i > 0 and not isinstance(m, torch.nn.Dropout)]
    return linears[0] if len(linears) == 1 and isinstance(net[linears[0]], FP8Linear) else None


def fuse_gelu_quant(denoiser) -> int:
    """Rebind the forwards of the blocks this applies to (see the module docstring); return how many.
    Idempotent; a module whose parts are not FP8Linear (bf16, INT8, another activation) keeps its forward."""
    stale = upstream.changed(COPIED)
    if stale:
        logger.warning("GELU + FP8 fusion off: the diffusers code it copies changed: {}", ", ".join(stale))
        return 0
    done = 0
    for m in denoiser.modules():
        if getattr(m, "_fused_gelu_quant", False):
            continue
        if _single_fits(m):
            m.forward = types.MethodType(_single_block_forward, m)
        elif (i := _ff_out(m)) is not None:
            m._fused_out = i
            m.forward = types.MethodType(_feed_forward, m)
        else:
            continue
        m._fused_gelu_quant = True
        done += 1
    return done
