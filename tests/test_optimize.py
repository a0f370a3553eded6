"""The speed recipe: what `choose_recipe` decides per GPU plan, and what `apply_recipe` does to the real
tiny FLUX and SDXL pipelines (fusion, FP8 swap with the family skip lists, attention, compile) and how
far the FP8 path moves their outputs.

The GPU is the only thing not here: a Plan with capability (9, 0) is plain data, and FP8Linear's CPU
forward is its reference path (dequantized weights), the same weights `torch._scaled_mm` multiplies on
the GPU. Nothing is patched: the fa3-fwd wheel's absence on this machine is real.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
from loguru import logger
from torch import nn

from app.attention import set_attention
from app.config import Settings
from app.families.flux import FAMILY as FLUX
from app.families.sdxl import FAMILY as SDXL
from weights.fp8 import E4M3 as FP8, E4M3_MAX, FP8Linear, fits_scaled_mm, quantize_rows, swap_linears
from app.optimize import STEPS, Recipe, apply_recipe, choose_recipe
from weights.quantize import fuse_qkv, is_torchao, quantize_denoiser
from preflight.plan import Plan, best_precision

FAMILIES = {"flux": (FLUX, FLUX.build_tiny), "sdxl": (SDXL, SDXL.build_tiny)}
FP8_RECIPE = Recipe(fuse_qkv=True, quantize="fp8")
# What a call through the tiny pipelines costs least: 64x64 is 8x8 latents (16 FLUX tokens), 2 steps.
CALL = dict(height=64, width=64, num_inference_steps=2, output_type="np")
CALL_KW = {"flux": dict(max_sequence_length=16), "sdxl": {}}


@pytest.fixture(autouse=True)
def _keep_attention_backend():
    """`set_attention_backend` also sets diffusers' process-wide default backend; a cudnn default left
    behind would break every later CPU test whose processors follow the default."""
    import diffusers.models.attention_dispatch as ad

    saved = ad._AttentionBackendRegistry._active_backend
    yield
    ad._AttentionBackendRegistry._active_backend = saved


def tiny(name):
    family, build = FAMILIES[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    return pipe, family


def den(pipe, family):
    return getattr(pipe, family.denoiser)


# ---- choose_recipe: one decision per kind of card -------------------------------------------------

def plan_for(capability, name="gpu"):
    """The plan preflight's `auto` precision gives a card of this capability (None: no GPU)."""
    if capability is None:
        return Plan("cpu", best_precision(None))
    return Plan("cuda", best_precision(capability), capability, name)


@pytest.mark.parametrize("capability, settings, expected", [
    # No GPU: the tiny reference path runs as built, whatever the settings ask for.
    (None, Settings(compile="full", attention="fa3"), Recipe()),
    # H100: FP8 + FA3, compile from COMPILE (regional by default).
    ((9, 0), Settings(), Recipe(fuse_qkv=True, quantize="fp8", attention="fa3", compile="regional", fuse_gelu_quant=True)),
    ((9, 0), Settings(compile="full"), Recipe(fuse_qkv=True, quantize="fp8", attention="fa3", compile="full", fuse_gelu_quant=True)),
    ((9, 0), Settings(compile="off"), Recipe(fuse_qkv=True, quantize="fp8", attention="fa3", compile="off", fuse_gelu_quant=True)),
    # L4 / RTX 4090 (Ada): FP8, but FA3 is Hopper-only: cuDNN attention.
    ((8, 9), Settings(), Recipe(fuse_qkv=True, quantize="fp8", attention="cudnn", compile="regional", fuse_gelu_quant=True)),
    # A100 / A10: INT8 (no FP8 tensor cores), cuDNN attention.
    ((8, 0), Settings(), Recipe(fuse_qkv=True, quantize="int8", attention="cudnn", compile="regional")),
    ((8, 6), Settings(), Recipe(fuse_qkv=True, quantize="int8", attention="cudnn", compile="regional")),
    # T4 (Turing): bf16, no quantization; cuDNN's SDPA needs sm_80, so PyTorch's default SDPA.
    ((7, 5), Settings(), Recipe(fuse_qkv=True, quantize="none", attention="native", compile="regional")),
    # ATTENTION set explicitly is honoured as given, on any card.
    ((9, 0), Settings(attention="flash"), Recipe(fuse_qkv=True, quantize="fp8", attention="flash", compile="regional", fuse_gelu_quant=True)),
    ((9, 0), Settings(attention="native"), Recipe(fuse_qkv=True, quantize="fp8", attention="native", compile="regional", fuse_gelu_quant=True)),
    ((8, 9), Settings(attention="fa3"), Recipe(fuse_qkv=True, quantize="fp8", attention="fa3", compile="regional", fuse_gelu_quant=True)),
    ((9, 0), Settings(cuda_graphs=True),
     Recipe(fuse_qkv=True, quantize="fp8", attention="fa3", compile="regional", cuda_graphs=True, fuse_gelu_quant=True)),
    (None, Settings(cuda_graphs=True), Recipe()),  # never on the CPU
    # LORAS=1: the branches at LORA_MAX_RANK, on the CPU too (the tests' reference path)
    ((9, 0), Settings(loras=True, lora_max_rank=32),
     Recipe(fuse_qkv=True, quantize="fp8", attention="fa3", compile="regional", fuse_gelu_quant=True, lora_rank=32)),
    (None, Settings(loras=True), Recipe(lora_rank=64)),
])
def test_choose_recipe_per_plan(capability, settings, expected):
    assert choose_recipe(plan_for(capability), settings) == expected


@pytest.mark.parametrize("family, cuda_graphs, expected", [
    (SDXL, None, True),  # launch-bound UNet: graphs on unless CUDA_GRAPHS says otherwise
    (SDXL, False, False),
    (FLUX, None, False),  # GPU-bound: off by default
    (FLUX, True, True),
])
def test_cuda_graphs_follow_the_family_unless_set(family, cuda_graphs, expected):
    recipe = choose_recipe(plan_for((9, 0)), Settings(cuda_graphs=cuda_graphs), family)
    assert recipe.cuda_graphs is expected
    assert choose_recipe(plan_for(None), Settings(cuda_graphs=cuda_graphs), family).cuda_graphs is False


def test_a_forced_bf16_plan_on_hopper_does_not_quantize():
    plan = Plan("cuda", "bf16", (9, 0), "NVIDIA H100 80GB HBM3")
    assert choose_recipe(plan, Settings()).quantize == "none"


# ---- the FP8 primitives ----------------------------------------------------------------------------

def test_quantize_rows_scales_each_row_to_the_e4m3_range():
    """Rows six orders of magnitude apart (as in real checkpoints: norms vs projections, outlier rows)
    each use the full e4m3 range; an unscaled or per-tensor quantizer flushes the small rows to zero
    or clamps the large ones, and fails the element bound below."""
    g = torch.Generator().manual_seed(0)
    mags = torch.logspace(-4, 3, 32).unsqueeze(1)
    w = torch.randn(32, 64, generator=g) * mags
    q, scale = quantize_rows(w)
    assert q.dtype == FP8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (32, 1)
    # Each row's largest value maps to the largest e4m3 code.
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((32,), E4M3_MAX))
    deq = q.float() * scale
    # e4m3 keeps 3 mantissa bits: a normal value rounds within 2^-4 of itself; below 2^-6 (subnormals)
    # the step is 2^-9, so the absolute error is at most 2^-10 in code units (times the row's scale).
    bound = w.abs() * 2**-4 + scale * 2**-10
    assert ((deq - w).abs() <= bound * 1.0001).all()


def test_fp8_linear_matches_the_linear_it_replaces():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = FP8Linear.from_linear(lin)
    assert q.weight.dtype == FP8 and q.weight_scale.shape == (48, 1) and q.out_dtype == torch.float32
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        ref, got = lin(x), q(x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, x @ q.dequantized_weight().t() + lin.bias)  # the reference path's rule
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.05  # quantized (not a copy) and within e4m3's ~3.6% RMS weight rounding


def test_fp8_linear_survives_a_pipeline_wide_dtype_cast():
    """`pipe.to(torch.bfloat16)` after quantizing must move the codes and scales, never cast them."""
    lin = FP8Linear.from_linear(nn.Linear(32, 32))
    codes, scale = lin.weight.clone(), lin.weight_scale.clone()
    lin.to(torch.bfloat16)
    assert lin.weight.dtype == FP8 and torch.equal(lin.weight.view(torch.uint8), codes.view(torch.uint8))
    assert lin.weight_scale.dtype == torch.float32 and torch.equal(lin.weight_scale, scale)
    assert lin.bias.dtype == torch.bfloat16 and lin.out_dtype == torch.bfloat16


def test_swap_linears_leaves_kept_and_misaligned_linears_alone():
    m = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 24), nn.Linear(32, 32))
    assert not fits_scaled_mm(m[1])
    swapped = swap_linears(m, keep=lambda name: name == "2")
    assert swapped == ["0"]
    assert isinstance(m[0], FP8Linear) and type(m[1]) is nn.Linear and type(m[2]) is nn.Linear
    assert swap_linears(m, keep=lambda name: name == "2") == []


# ---- the recipe on the tiny pipelines ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_fp8_recipe_structure(name):
    """After fuse + FP8 on a bf16 pipeline (as on the GPU): skip list untouched in bf16, block linears
    FP8 with fp32 row scales, unfused projections gone, SDXL cross-attention keeps its query."""
    pipe, family = tiny(name)
    pipe.to(torch.bfloat16)
    before = {n: type(m) for n, m in den(pipe, family).named_modules()}
    skipped = [n for n, t in before.items() if t is nn.Linear and family.skips(n)]
    assert skipped, "the skip list matches nothing: the test would prove nothing"

    applied = apply_recipe(pipe, family, FP8_RECIPE)
    assert list(applied) == ["fuse_qkv", "quantize"]
    d = den(pipe, family)
    after = dict(d.named_modules())

    for n in skipped:  # embedders, final projection, modulation: still the bf16 linears they were
        assert type(after[n]) is nn.Linear and after[n].weight.dtype == torch.bfloat16, n
    # Every other linear is FP8 (the tiny models' widths are all multiples of 16).
    leftover = [n for n, m in after.items() if type(m) is nn.Linear and not family.skips(n)]
    assert leftover == []
    fp8 = {n: m for n, m in after.items() if isinstance(m, FP8Linear)}
    assert fp8 and not any(family.skips(n) for n in fp8)
    for n, m in fp8.items():
        assert m.weight.dtype == FP8, n
        assert m.weight_scale.dtype == torch.float32 and m.weight_scale.shape == (m.out_features, 1), n
        assert m.out_dtype == torch.bfloat16 and (m.bias is None or m.bias.dtype == torch.bfloat16), n

    attns = {n: m for n, m in after.items() if hasattr(m, "to_out")}
    assert attns
    for n, a in attns.items():
        kids = set(a._modules)
        if "to_qkv" in kids:  # self-attention: one fused projection, the three originals gone
            assert not kids & {"to_q", "to_k", "to_v"}, n
            assert isinstance(a.to_qkv, FP8Linear) and a.to_qkv.out_features == 3 * a.inner_dim, n
        else:  # SDXL cross-attention: the query reads the image, K/V the text; only K/V fuse
            assert name == "sdxl" and n.endswith("attn2"), n
            assert {"to_q", "to_kv"} <= kids and not kids & {"to_k", "to_v"}, n
            assert isinstance(a.to_q, FP8Linear) and isinstance(a.to_kv, FP8Linear), n
        if "to_added_qkv" in kids:  # FLUX's joint blocks: the text stream's projections fuse too
            assert not kids & {"add_q_proj", "add_k_proj", "add_v_proj"}, n
    if name == "sdxl":
        assert any(n.endswith("attn2") for n in attns) and any(n.endswith("attn1") for n in attns)
    else:
        assert any("to_added_qkv" in a._modules for a in attns.values())


@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_fp8_recipe_is_idempotent(name):
    pipe, family = tiny(name)
    apply_recipe(pipe, family, FP8_RECIPE)
    d = den(pipe, family)
    types = {n: type(m) for n, m in d.named_modules()}
    state = {k: v.clone() for k, v in d.state_dict().items()}
    apply_recipe(pipe, family, FP8_RECIPE)
    assert fuse_qkv(d) == 0 and quantize_denoiser(d, "fp8", family.skips) == []
    assert {n: type(m) for n, m in d.named_modules()} == types
    again = d.state_dict()
    assert again.keys() == state.keys()
    for k, v in state.items():  # bitwise: FP8 codes compared as bytes (no float8 equality on CPU)
        assert again[k].dtype == v.dtype and torch.equal(again[k].view(torch.uint8), v.view(torch.uint8)), k


def test_steps_run_in_the_documented_order():
    """fuse before quantize (else the fused to_qkv would be born bf16), attention on the quantized
    model, the LoRA branches beside the quantized linears, compile after them (it traces the final
    modules), CUDA graphs last (they record what compile produced)."""
    assert [s[0] for s in STEPS] == ["fuse_qkv", "quantize", "lora", "attention", "compile", "cuda_graphs"]
    pipe, family = tiny("flux")
    full = Recipe(fuse_qkv=True, quantize="fp8", attention="cudnn", compile="regional",
                  cuda_graphs=True, fuse_gelu_quant=True, lora_rank=16)
    applied = apply_recipe(pipe, family, full)  # compile only wraps the blocks; nothing runs here
    assert list(applied) == [s[0] for s in STEPS]
    block = pipe.transformer.transformer_blocks[0]
    assert isinstance(block.attn.to_qkv, FP8Linear) and _compiled(block)
    assert block.attn.to_qkv.lora_capacity == 3 * 16  # q, k and v pieces: a rank each


# ---- fidelity ---------------------------------------------------------------------------------------

# Measured with this suite's inputs: FP8 moves the tiny denoisers' output by 0.4% (FLUX) and 0.7%
# (SDXL); codes left unscaled (w cast to e4m3 directly, dequantized with the row scale) move it by
# 10-22%. The bound sits between, with room for other seeds and torch versions.
DENOISER_REL_ERR = 0.03
# Images in [0, 1]: FP8 changes a pixel by 0.0003-0.0006 on average; the unscaled quantizer by 0.008-0.014.
IMAGE_MEAN_ABS = 0.003


@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_fp8_denoiser_and_image_stay_close_to_full_precision(name):
    pipe, family = tiny(name)
    inputs = family.denoiser_inputs(pipe, 64, 64)

    def outputs():
        with torch.inference_mode():
            step = den(pipe, family)(**inputs)[0].float()
            image = pipe("a red cat", generator=torch.Generator().manual_seed(1), **CALL, **CALL_KW[name]).images
        return step, image

    ref_step, ref_image = outputs()
    apply_recipe(pipe, family, FP8_RECIPE)
    step, image = outputs()
    rel = ((step - ref_step).norm() / ref_step.norm()).item()
    assert 1e-4 < rel < DENOISER_REL_ERR, rel  # something was quantized, and not broken
    assert np.isfinite(image).all() and image.shape == ref_image.shape
    assert np.abs(image - ref_image).mean() < IMAGE_MEAN_ABS


# ---- compile: which modules get compiled (decided, not run: CPU inductor needs minutes here) -------

def _compiled(module) -> bool:
    """Compiled as a whole (`module.compile()`) or on its `forward` (app.optimize.compile_blocks)."""
    return (getattr(module, "_compiled_call_impl", None) is not None
            or hasattr(module.__dict__.get("forward"), "_torchdynamo_orig_callable"))


def test_regional_compile_wraps_flux_repeated_blocks_only():
    pipe, family = tiny("flux")
    d = pipe.transformer
    assert set(d._repeated_blocks) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    apply_recipe(pipe, family, Recipe(compile="regional"))
    assert pipe.transformer is d  # the model itself is not wrapped
    blocks = [m for m in d.modules() if type(m).__name__ in d._repeated_blocks]
    assert len(blocks) == len(d.transformer_blocks) + len(d.single_transformer_blocks) > 0
    assert all(_compiled(b) for b in blocks)
    others = [n for n, m in d.named_modules() if _compiled(m) and type(m).__name__ not in d._repeated_blocks]
    assert others == []


def test_regional_compile_of_the_sdxl_unet():
    """diffusers 0.42.1's UNet2DConditionModel declares `_repeated_blocks = ["BasicTransformerBlock"]`,
    so "regional" compiles its transformer blocks (resnets stay eager), not the whole UNet."""
    pipe, family = tiny("sdxl")
    unet = pipe.unet
    assert unet._repeated_blocks == ["BasicTransformerBlock"]
    apply_recipe(pipe, family, Recipe(compile="regional"))
    assert pipe.unet is unet
    compiled = [type(m).__name__ for m in unet.modules() if _compiled(m)]
    assert compiled and set(compiled) == {"BasicTransformerBlock"}


def test_regional_without_repeated_blocks_and_full_compile_the_whole_denoiser():
    from torch._dynamo.eval_frame import OptimizedModule

    pipe, family = tiny("sdxl")
    unet = pipe.unet
    unet._repeated_blocks = []  # a denoiser that declares none (instance attribute: the class is shared)
    apply_recipe(pipe, family, Recipe(compile="regional"))
    assert isinstance(pipe.unet, OptimizedModule) and pipe.unet._orig_mod is unet
    assert not any(_compiled(m) for m in unet.modules())

    pipe, family = tiny("flux")
    d = pipe.transformer
    apply_recipe(pipe, family, Recipe(compile="full"))
    assert isinstance(pipe.transformer, OptimizedModule) and pipe.transformer._orig_mod is d


# ---- attention --------------------------------------------------------------------------------------

def _backends(d):
    return {getattr(m.processor, "_attention_backend", "-") for m in d.modules() if hasattr(m, "processor")}


@pytest.mark.skipif(importlib.util.find_spec("fa3_fwd_interface") is not None, reason="fa3-fwd is installed here")
@pytest.mark.parametrize("name", ["fa3", "fa3_fp8"])  # fa3_fp8 runs the same wheel's kernel on e4m3 inputs
def test_fa3_without_its_wheel_falls_back_to_cudnn_and_says_so(name):
    from diffusers.models.attention_dispatch import AttentionBackendName

    pipe, _ = tiny("flux")
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        used = set_attention(pipe.transformer, name)
    finally:
        logger.remove(sink)
    assert used == "cudnn"
    assert _backends(pipe.transformer) == {AttentionBackendName._NATIVE_CUDNN}
    assert any("fa3 attention unavailable" in line for line in lines)


@pytest.mark.skipif(importlib.util.find_spec("fa3_fwd_interface") is not None, reason="fa3-fwd is installed here")
def test_fa3_fp8_recipe_without_the_wheel_runs_on_cudnn_and_reports_it():
    """Through apply_recipe, as the worker does: the step's log line names the backend actually used."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    pipe, family = tiny("flux")
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    try:
        applied = apply_recipe(pipe, family, Recipe(attention="fa3_fp8"))
    finally:
        logger.remove(sink)
    assert list(applied) == ["attention"]
    assert _backends(pipe.transformer) == {AttentionBackendName._NATIVE_CUDNN}
    assert any("attention: fa3_fp8 requested, cudnn used" in line for line in lines)


def test_attention_on_a_unet_without_backend_aware_processors_reports_native():
    """SDXL's AttnProcessor2_0 calls SDPA itself: a backend set on it would be a silent no-op."""
    import diffusers.models.attention_dispatch as ad

    pipe, _ = tiny("sdxl")
    active = ad._AttentionBackendRegistry._active_backend
    assert set_attention(pipe.unet, "cudnn") == "native"
    assert _backends(pipe.unet) == {"-"}
    assert ad._AttentionBackendRegistry._active_backend == active  # nothing process-wide changed either


def test_native_attention_changes_nothing():
    pipe, _ = tiny("flux")
    state = _backends(pipe.transformer)
    assert set_attention(pipe.transformer, "native") == "native"
    assert _backends(pipe.transformer) == state


def test_a_deep_copy_quantizes_like_the_original():
    """The bake quantizes a denoiser, the loader a fresh skeleton of it: same names, same codes."""
    pipe, family = tiny("flux")
    a, b = pipe.transformer, copy.deepcopy(pipe.transformer)
    assert quantize_denoiser(a, "fp8", family.skips) == quantize_denoiser(b, "fp8", family.skips)
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v.view(torch.uint8), v2.view(torch.uint8)), k


@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_int8_recipe_quantizes_the_same_linears_and_stays_close(name):
    """The Ampere plan: torchao's dynamic INT8 on exactly the linears FP8 would take (same skip list),
    once (a second pass finds nothing), with an output as close as FP8's."""

    pipe, family = tiny(name)
    inputs = family.denoiser_inputs(pipe, 64, 64)
    d = den(pipe, family)
    with torch.inference_mode():
        ref = d(**inputs)[0].float()
    fp8_names = quantize_denoiser(copy.deepcopy(d), "fp8", family.skips)
    applied = apply_recipe(pipe, family, Recipe(fuse_qkv=True, quantize="int8"))
    assert list(applied) == ["fuse_qkv", "quantize"]
    int8 = sorted(n for n, m in d.named_modules() if isinstance(m, nn.Linear) and is_torchao(m.weight))
    assert int8 == sorted(fp8_names) and int8
    assert not any(is_torchao(m.weight) for n, m in d.named_modules() if isinstance(m, nn.Linear) and family.skips(n))
    assert quantize_denoiser(d, "int8", family.skips) == []
    with torch.inference_mode():
        got = d(**inputs)[0].float()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < DENOISER_REL_ERR, rel


def test_unknown_precision_is_refused():
    pipe, family = tiny("sdxl")
    with pytest.raises(ValueError, match="unknown precision 'fp4'"):
        quantize_denoiser(pipe.unet, "fp4", family.skips)
