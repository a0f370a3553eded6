"""Per-job LoRA (LORAS=1) on the tiny FLUX with FP8 weights, through Service.run: the LoRA files are
served by a loopback HTTP server (the fetch guard opened to 127.0.0.1/32 only, its test seam).

The denoiser is quantized by the loader (as a baked FP8 model is: the CPU recipe does not quantize),
so every branch here is the FP8 one, on FP8Linear's CPU reference path (the same numbers as CUDA's
FP8 GEMMs up to their accumulation order; the GEMMs themselves are GPU-only: bench lora).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save
from safetensors.torch import load as load_bytes

from app.config import Settings
from app.families.flux import FAMILY as FLUX
from app.fetch import FetchLimits
from app.loading import load_pipeline
from app.schema import parse_job
from app.errors import InvalidInput
from tests import helpers_flux
from tests.helpers_flux import rel
from tests.helpers_net import http_server
from weights.fp8 import FP8Linear
from weights.lora_branch import LoRAFP8Linear, LoRALinear, branches
from weights.quantize import quantize_denoiser

TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
           "transformer_blocks.0.ff.net.0.proj", "single_transformer_blocks.1.proj_mlp",
           "single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.attn.to_k", "proj_out")
JOB = {"prompt": "a red cat", "seed": 3, "num_inference_steps": 2}


def lora_bytes(targets=TARGETS, rank=4, seed=0, alpha=None) -> bytes:
    """A peft/diffusers-format LoRA (`transformer.<module>.lora_A/B.weight`) for the tiny FLUX's layers."""
    ref = dict(FLUX.build_tiny().transformer.named_modules())
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in targets:
        mod = ref.get(name) or torch.nn.Linear(32, 32)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.3
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.3
        if alpha is not None:
            state[f"transformer.{name}.alpha"] = torch.tensor(float(alpha))
    return save(state)


def kohya_bytes(rank=4) -> bytes:
    """A Kohya (sd-scripts) FLUX LoRA: `lora_unet_double_blocks_0_img_attn_qkv.lora_down/up` and alphas; its
    fused qkv is split by diffusers' converter (single blocks' linear1 is not: the converter hard-codes
    FLUX.1's 3072 widths)."""
    g = torch.Generator().manual_seed(7)
    state = {}
    for name, fan_in, fan_out in (("double_blocks_0_img_attn_qkv", 32, 96), ("double_blocks_0_txt_mlp_0", 32, 128),
                                  ("single_blocks_0_linear2", 160, 32)):
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g) * 0.3
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=g) * 0.3
        state[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
    return save(state)


FILES = {"/kohya.safetensors": kohya_bytes(),
"/a.safetensors": lora_bytes(seed=0), "/b.safetensors": lora_bytes(seed=1, rank=8, alpha=4),
         "/other.safetensors": lora_bytes(targets=(TARGETS[0], "transformer_blocks.7.attn.to_q")),
         "/big.safetensors": lora_bytes(rank=16)}


class Files(BaseHTTPRequestHandler):
    hits: list = []

    def do_GET(self):
        Files.hits.append(self.path)
        if self.path == "/redirect":  # to a private address: each hop is guarded
            self.send_response(302)
            self.send_header("Location", "http://10.0.0.7/x.safetensors")
            self.end_headers()
            return
        body = FILES.get(self.path.split("?")[0])
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *a):
        pass


def fp8_loader(source, plan, cache_dir):
    """The tiny pipeline with its denoiser in FP8 (as a baked FP8 model loads)."""
    pipe = load_pipeline(source, plan, cache_dir)
    quantize_denoiser(pipe.transformer, "fp8", FLUX.skips)
    return pipe


@pytest.fixture(scope="module")
def base():
    with http_server(Files) as url:
        yield url


@pytest.fixture(scope="module")
def svc(base, tmp_path_factory):
    from app.service import Service

    root = tmp_path_factory.mktemp("lora-svc")
    s = Service.load(Settings(output_uri=str(root / "out"), device="cpu", preflight=False, warmup=False,
                              loras=True, lora_max_rank=16, lora_cache=str(root / "cache")), loader=fp8_loader)
    s.fetch_limits = FetchLimits(allow_networks=("127.0.0.1/32",))
    return s


def run(svc, job_id, **extra) -> tuple[dict, np.ndarray]:
    result = svc.run({**JOB, **extra}, job_id)
    assert "error" not in result, result
    png = (svc.store.root / result["images"][0]["key"]).read_bytes()
    return result, np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32)


def forward(transformer):
    return helpers_flux.forward(transformer, seed=5)


@pytest.fixture(scope="module")
def reference():
    """For each LoRA: the fp32 tiny FLUX (unfused, unquantized) with it loaded by diffusers itself, and that
    LoRA fused by diffusers into the fp32 weights then quantized to FP8 (the bake's way): its error
    against the first is what FP8 rounding alone costs."""
    out = {}
    for name, scale in (("a", 0.8), ("b", -1.5)):
        pipe = FLUX.build_tiny()
        out.setdefault("plain", forward(pipe.transformer))
        pipe.load_lora_weights(load_bytes(FILES[f"/{name}.safetensors"]), adapter_name=name)
        pipe.set_adapters([name], [scale])
        out[name] = forward(pipe.transformer)
        pipe.set_adapters([name], [1.0])
        pipe.fuse_lora(lora_scale=scale, adapter_names=[name])
        pipe.unload_lora_weights()
        quantize_denoiser(pipe.transformer, "fp8", FLUX.skips)
        out[f"{name}_fp8_err"] = rel(forward(pipe.transformer), out[name])
    return out


def test_the_branches_exist_beside_fp8_and_bf16_linears(svc):
    found = branches(svc.pipe.transformer)
    assert "transformer_blocks.0.attn.to_qkv" in found and "proj_out" in found
    assert isinstance(found["transformer_blocks.0.attn.to_qkv"], LoRAFP8Linear)
    assert isinstance(found["proj_out"], LoRALinear)  # the skip list's bf16 layer: a bf16 branch
    assert found["transformer_blocks.0.attn.to_qkv"].lora_capacity == 3 * 16
    assert not any(type(m) in (FP8Linear, torch.nn.Linear) for m in svc.pipe.transformer.modules())


def use(svc, loras) -> list[dict]:
    """The LoRA step of Service.run alone (its fetch, cache and writes), for checks that need no image."""
    job = parse_job({**JOB, "loras": loras}, svc.family)
    return svc.loras.for_job(job, svc.fetch_limits, svc.lora_max_bytes, time.monotonic() + 30)


def test_loras_in_sequence_equal_diffusers_own_and_leave_nothing_behind(svc, base, reference):
    """Through Service.run: plain, a, (b), a again (a cache hit), plain again; b and scale 0 through the
    same LoRA step without an image. With a LoRA the denoiser equals diffusers' own load_lora_weights
    within FP8 rounding (that of the LoRA fused into the weights, then quantized: the bake's way)."""
    Files.hits.clear()
    a = {"source": f"{base}/a.safetensors", "scale": 0.8}
    b = {"source": f"{base}/b.safetensors", "scale": -1.5}
    _, plain = run(svc, "seq-plain")
    plain_out = forward(svc.pipe.transformer)
    first, with_a = run(svc, "seq-a", loras=[a])
    assert first["loras"] == [{"sha256": hashlib.sha256(FILES["/a.safetensors"]).hexdigest(), "scale": 0.8,
                                "layers": len(TARGETS)}]
    for name, ref in (("a", a), ("b", b)):
        if name == "b":
            use(svc, [ref])
        ours, fp8_err = forward(svc.pipe.transformer), reference[f"{name}_fp8_err"]  # fp8_err: about 0.01
        assert rel(reference["plain"], reference[name]) > 0.05  # the LoRA matters: a dropped one fails below
        assert rel(ours, reference[name]) < 1.5 * fp8_err, (name, rel(ours, reference[name]), fp8_err)
    use(svc, [{**a, "scale": 0.0}])
    assert torch.equal(forward(svc.pipe.transformer), plain_out)  # scale 0 is no LoRA, exactly
    use(svc, [b])
    again, again_a = run(svc, "seq-a2", loras=[a])
    result, after = run(svc, "seq-after")
    assert np.abs(with_a - plain).mean() > 1
    assert np.array_equal(again_a, with_a)  # b's branches were overwritten, not added to
    assert np.array_equal(after, plain)  # the job after a LoRA job keeps nothing of it
    assert "loras" not in result and "loras_ms" in result["timings"]
    assert Files.hits == ["/a.safetensors", "/b.safetensors"]  # the second use of a: the cache's
    assert again["loras"] == first["loras"]


def test_two_loras_sum_as_diffusers_adds_adapters(svc, base):
    pipe = FLUX.build_tiny()
    for name in ("a", "b"):
        pipe.load_lora_weights(load_bytes(FILES[f"/{name}.safetensors"]), adapter_name=name)
    pipe.set_adapters(["a", "b"], [0.5, 0.7])
    want = forward(pipe.transformer)
    use(svc, [{"source": f"{base}/a.safetensors", "scale": 0.5}, {"source": f"{base}/b.safetensors", "scale": 0.7}])
    assert rel(forward(svc.pipe.transformer), want) < 0.02


def test_a_kohya_lora_equals_diffusers_own(svc, base):
    pipe = FLUX.build_tiny()
    plain = forward(pipe.transformer)
    pipe.load_lora_weights(load_bytes(FILES["/kohya.safetensors"]))
    want = forward(pipe.transformer)
    assert use(svc, [{"source": f"{base}/kohya.safetensors"}])[0]["layers"] == 5  # q, k, v, ff_context, proj_out
    assert rel(forward(svc.pipe.transformer), want) < 0.02 < rel(plain, want)


def test_the_disk_cache_serves_a_known_source_or_hash_without_fetching(svc, base):
    Files.hits.clear()
    ref = {"source": f"{base}/a.safetensors?v=cache", "scale": 0.3}
    first = use(svc, [ref])
    svc.loras._parsed.clear()  # as a new process would: the file is read from disk
    assert use(svc, [ref]) == first and Files.hits == ["/a.safetensors?v=cache"]
    sha = first[0]["sha256"]
    assert svc.loras.cache.file(sha).read_bytes() == FILES["/a.safetensors"]
    assert use(svc, [{"source": f"{base}/gone.safetensors", "sha256": sha, "scale": 0.3}]) == first
    assert Files.hits == ["/a.safetensors?v=cache"]


def test_the_cache_evicts_the_least_recently_used(tmp_path):
    from app.lora_cache import LoraCache

    cache = LoraCache(tmp_path, max_bytes=2500)
    for i, name in enumerate("xyz"):
        cache.get(f"https://h/{name}", lambda: bytes([i]) * 1000)
        os.utime(cache.file(hashlib.sha256(bytes([i]) * 1000).hexdigest()), (i, i))
    kept = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(kept) == 2 and hashlib.sha256(bytes([0]) * 1000).hexdigest() + ".safetensors" not in kept
    assert cache.get("https://h/y", lambda: 1 / 0)[2]  # still there: no fetch


@pytest.mark.parametrize("path, extra, field, words", [
    ("/other.safetensors", {}, "loras[0]", "targets layer transformer_blocks.7.attn.to_q"),
    ("/big.safetensors", {}, "loras", "needs rank"),
    ("/missing.safetensors", {}, "loras[0]", "HTTP 404"),
    ("/a.safetensors", {"sha256": "0" * 64}, "loras[0]", "sha256 is"),
])
def test_a_lora_that_cannot_apply_fails_the_job_by_name(svc, base, path, extra, field, words):
    use(svc, [{"source": f"{base}/a.safetensors", "scale": 0.8}])
    held = {n: m.lora_B.clone() for n, m in svc.loras.slots.items()}
    loras = [{"source": f"{base}{path}", **extra}]
    if words == "needs rank":  # rank 16 x2 over the 16 of a plain layer (q/k/v pieces get 16 each)
        loras = loras * 2
    err = svc.run({**JOB, "loras": loras}, "bad")["error"]
    assert err["type"] == "invalid_input" and err["field"] == field and words in err["message"], err
    assert all(torch.equal(held[n], m.lora_B) for n, m in svc.loras.slots.items())  # nothing half-written


def test_hostile_and_oversized_sources_are_refused(svc, base):
    guarded = replace(svc.fetch_limits, allow_networks=())
    svc.fetch_limits = guarded  # as deployed: loopback and private addresses refused
    try:
        for url, kind in ((f"{base}/a.safetensors?v=guard", "a loopback address"),
                          ("http://10.0.0.7/x.safetensors", "a private address"),
                          ("http://169.254.169.254/latest", "a cloud metadata address")):
            err = svc.run({**JOB, "loras": [{"source": url}]}, "hostile")["error"]
            assert err["field"] == "loras[0]" and f"resolves to {kind}; refused" in err["message"], err
    finally:
        svc.fetch_limits = FetchLimits(allow_networks=("127.0.0.1/32",))
    err = svc.run({**JOB, "loras": [{"source": f"{base}/redirect"}]}, "redirect")["error"]
    assert err["field"] == "loras[0]" and "resolves to a private address; refused" in err["message"], err
    svc.lora_max_bytes = 1000
    try:
        err = svc.run({**JOB, "loras": [{"source": f"{base}/a.safetensors?v=big"}]}, "big")["error"]
    finally:
        del svc.lora_max_bytes
    assert err["field"] == "loras[0]" and "LoRA file is" in err["message"] and "1000 byte limit" in err["message"]


@pytest.mark.parametrize("loras, field, words", [
    ([{"source": "org/some-lora"}], "loras[0].source", "hub ids are not fetched"),
    ([{"source": "file:///etc/passwd"}], "loras[0].source", "scheme file: not allowed"),
    ([{"source": "data:application/octet-stream;base64,AAAA"}], "loras[0].source", "not allowed"),
    ([{"source": "https://x/a.safetensors", "scale": 9}], "loras[0].scale", "less than or equal to 4"),
    ([{"source": "https://x/a.safetensors", "scale": float("nan")}], "loras[0].scale", "finite"),
    ([{"source": "https://x/a.safetensors", "sha256": "abc"}], "loras[0].sha256", "pattern"),
    ([{"source": "https://x/a.safetensors", "weight": 1}], "loras[0].weight", "unknown field"),
    ([{"source": "https://x/a.safetensors"}] * 4, "loras", "at most 3"),
])
def test_the_contract_bounds_loras(loras, field, words):
    with pytest.raises(InvalidInput) as e:
        parse_job({**JOB, "loras": loras}, FLUX)
    assert e.value.field == field and words in e.value.message, e.value.message


def test_a_worker_without_loras_refuses_them(tmp_path):
    from app.service import Service

    s = Service.load(Settings(output_uri=str(tmp_path), device="cpu", preflight=False, warmup=False))
    err = s.run({**JOB, "loras": [{"source": "https://example.com/a.safetensors"}]}, "no")["error"]
    assert err["field"] == "loras" and "LORAS=1" in err["message"]
    assert not branches(s.pipe.transformer)


def small_model():
    """Two FP8 linears with branches (rank 16), as the recipe leaves a block."""
    from weights.fp8 import swap_linears
    from weights.lora_branch import add_branches

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    swap_linears(model, keep=lambda name: False)
    assert add_branches(model, 16) == 2
    return model


def test_writing_a_lora_into_a_compiled_model_compiles_nothing():
    """Dynamo guards on the tensors' metadata, not their values: in-place writes keep the graph (the
    eager backend: the same tracing and guards, no Inductor codegen, so a CPU test stays cheap)."""
    from app.optimize import graphs_compiled

    model = small_model()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(8, 32)
    plain = compiled(x)
    before = graphs_compiled()
    a, b = torch.randn(4, 32), torch.randn(64, 4)
    model[0].write([(0, a, b)])
    with_lora = compiled(x)
    w = model[0].dequantized_weight().float() + b @ (model[0].lora_A[:4].float() * model[0].lora_A_scale[:4])
    want = model[2](torch.nn.functional.gelu(x @ w.t() + model[0].bias))
    assert torch.allclose(with_lora, want, atol=1e-5) and not torch.allclose(with_lora, plain)
    model[0].clear()
    assert torch.equal(compiled(x), plain)
    assert graphs_compiled() == before


def test_a_dtype_cast_moves_the_fp8_branch_without_casting_its_codes():
    model = small_model()
    model[0].write([(0, torch.randn(4, 32), torch.randn(64, 4))])
    codes = model[0].lora_A.clone()
    model.to(torch.bfloat16)
    assert model[0].lora_A.dtype == codes.dtype and torch.equal(model[0].lora_A.view(torch.uint8), codes.view(torch.uint8))
    assert model[0].lora_A_scale.dtype == torch.float32 and model[0].lora_B.dtype == torch.bfloat16


@pytest.mark.gpu
def test_the_fp8_branch_on_cuda_equals_its_dequantized_reference():
    """The CUDA path (two row-scaled FP8 GEMMs and addmm) against x @ (W + B A)^T in fp32."""
    model = small_model().to("cuda", torch.bfloat16)
    lin = model[0]
    lin.write([(0, torch.randn(16, 32) * 0.3, torch.randn(64, 16) * 0.3)])
    x = torch.randn(256, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = lin(x).float()
        a = lin.lora_A.float() * lin.lora_A_scale
        want = x.float() @ (lin.dequantized_weight().float() + lin.lora_B.float() @ a).t() + lin.bias.float()
    assert ((got - want).norm() / want.norm()).item() < 0.03  # x's e4m3 rounding (the main GEMM's too)


def test_qwen_image_edit_takes_the_same_loras(tmp_path):
    """The Qwen-Image family (its own diffusers LoRA loader, q/k/v unfused) through the same code: a
    LoRA lands on the layers it names, exactly as W + s B A, and one for another model is refused."""
    from app.families.qwen_image_edit import FAMILY as QWEN
    from app.lora import Loras
    from app.lora_cache import LoraCache
    from app.schema import LoraRef
    from weights.lora_branch import add_branches

    family = QWEN[0]
    pipe = family.build_tiny()
    den = pipe.transformer
    quantize_denoiser(den, "fp8", family.skips, fuse=family.fuse_qkv)
    add_branches(den, 16)
    loras = Loras(pipe, family, LoraCache(tmp_path, 1 << 20), 16)
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.img_mlp.net.2"]
    g = torch.Generator().manual_seed(0)
    mods = dict(den.named_modules())
    state = {}
    for n in names:
        state[f"transformer.{n}.lora_A.weight"] = torch.randn(4, mods[n].in_features, generator=g)
        state[f"transformer.{n}.lora_B.weight"] = torch.randn(mods[n].out_features, 4, generator=g)
    blob = save(state)
    records = loras.use([LoraRef(source="https://h/q.safetensors", scale=0.5)], lambda source, field: blob)
    assert records[0]["layers"] == 3
    lin = mods[names[0]]
    x = torch.randn(5, lin.in_features)
    a = state[f"transformer.{names[0]}.lora_A.weight"]
    b = state[f"transformer.{names[0]}.lora_B.weight"]
    want = x @ (lin.dequantized_weight().float() + 0.5 * b @ a).t() + lin.bias
    assert rel(lin(x), want) < 0.04  # the e4m3 rounding of A (a LoRA as large as W here: about 0.023)
    other = save({"transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight": torch.ones(4, 8),
                  "transformer.transformer_blocks.0.ff.net.0.proj.lora_B.weight": torch.ones(8, 4)})
    with pytest.raises(InvalidInput, match=r"loras\[0\]: targets layer transformer_blocks\.0\.ff\.net\.0\.proj"):
        loras.use([LoraRef(source="https://h/flux.safetensors")], lambda source, field: other)


def test_sdxl_takes_the_same_loras_exactly_on_its_bf16_unet(tmp_path):
    """SDXL's UNet (diffusers' SDXL LoRA loader; no FP8 on the CPU path: the plain-linear branch) equals
    diffusers' own load_lora_weights; a LoRA on one of its convolutions is refused naming it."""
    from app.families.sdxl import FAMILY as SDXL
    from app.lora import Loras
    from app.lora_cache import LoraCache
    from app.schema import LoraRef
    from weights.lora_branch import add_branches

    pipe = SDXL.build_tiny()
    mods = dict(pipe.unet.named_modules())
    names = [n for n in mods if n.endswith(("attn1.to_q", "attn2.to_k"))][:3]
    g = torch.Generator().manual_seed(0)
    state = {}
    for n in names:
        state[f"unet.{n}.lora_A.weight"] = torch.randn(4, mods[n].in_features, generator=g) * 0.5
        state[f"unet.{n}.lora_B.weight"] = torch.randn(mods[n].out_features, 4, generator=g) * 0.5
    inp = SDXL.denoiser_inputs(pipe, 256, 256)
    with torch.no_grad():
        plain = pipe.unet(**inp)[0]
    pipe.load_lora_weights({k: v.clone() for k, v in state.items()}, adapter_name="x")
    pipe.set_adapters(["x"], [0.7])
    with torch.no_grad():
        want = pipe.unet(**inp)[0]
    pipe.unload_lora_weights()
    add_branches(pipe.unet, 16)
    loras = Loras(pipe, SDXL, LoraCache(tmp_path, 1 << 20), 16)
    blob = save(state)
    assert loras.use([LoraRef(source="https://h/s.safetensors", scale=0.7)], lambda s, f: blob)[0]["layers"] == 3
    with torch.no_grad():
        got = pipe.unet(**inp)[0]
    assert rel(got, want) < 1e-5 < 0.05 < rel(plain, want)
    conv = next(n for n, m in mods.items() if isinstance(m, torch.nn.Conv2d))
    blob = save({f"unet.{conv}.lora_A.weight": torch.ones(4, 8), f"unet.{conv}.lora_B.weight": torch.ones(8, 4)})
    with pytest.raises(InvalidInput, match=f"targets layer {re.escape(conv)}, a Conv2d"):
        loras.use([LoraRef(source="https://h/c.safetensors")], lambda s, f: blob)
