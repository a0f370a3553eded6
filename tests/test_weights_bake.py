"""Bake -> load -> verify round trips on the tiny FLUX pipeline, and each failure mode's message."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from app.families.flux import FAMILY as FLUX
from weights.fp8 import FP8Linear, quantize_rows
from weights.quantize import quantize_denoiser
from weights import manifest as mf
from weights.__main__ import bake
from weights.errors import IntegrityError
from weights.load import Target, load_baked

CPU = Target("cpu", torch.float32)


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    out = tmp_path_factory.mktemp("bake") / "tiny-fp8"
    bake("tiny-flux", out, "fp8", device="cpu")
    return out


@pytest.fixture
def copy(baked, tmp_path):
    dst = tmp_path / "baked"
    shutil.copytree(baked, dst)
    return dst


def shard(root):
    return next((root / "transformer").glob("*.safetensors"))


def transformer_inputs():
    g = torch.Generator().manual_seed(3)
    return dict(hidden_states=torch.randn(1, 64, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.7]),
                img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))


def test_manifest_records_recipe_versions_and_hashes(baked):
    m = mf.read(baked)
    assert m["source"] == {"id": "tiny-flux", "revision": None} and m["family"] == "flux"
    assert m["recipe"]["precision"] == "fp8" and m["recipe"]["fused_qkv"] and m["recipe"]["quantized_layers"] == 14
    assert set(m["versions"]) == {"torch", "torchao", "diffusers", "transformers"}
    assert {"model_index.json", "vae/config.json", "transformer/config.json"} <= set(m["files"])
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in m["files"].values())
    assert mf.verify(baked)["ok"]


def linears(t):
    return {n: m for n, m in t.named_modules() if isinstance(m, (torch.nn.Linear, FP8Linear))}


def test_baked_structure_follows_the_skip_list(baked):
    t = load_baked(baked, CPU).transformer
    layers = linears(t)
    assert sum(isinstance(m, FP8Linear) for m in layers.values()) == 14
    for name, mod in layers.items():
        assert isinstance(mod, FP8Linear) != FLUX.skips(name), name
    attn = t.single_transformer_blocks[0].attn
    assert attn.fused_projections and not hasattr(attn, "to_q") and attn.to_qkv.weight.dtype == torch.float8_e4m3fn
    assert attn.to_qkv.weight_scale.dtype == torch.float32 and attn.to_qkv.weight_scale.shape == (attn.to_qkv.out_features, 1)
    assert attn.to_qkv.bias.dtype == torch.float32 and attn.to_qkv.out_dtype == torch.float32  # the plan's dtype
    assert t.x_embedder.weight.dtype == torch.float32  # plan dtype for high-precision layers


def test_baked_tensors_are_the_per_row_quantization_of_the_source(baked):
    """The stored codes and scales are exactly `quantize_rows` of the bf16 source's fused weight."""
    from app.families.flux import FAMILY as FLUX

    src = FLUX.build_tiny().transformer.to(torch.bfloat16).state_dict()
    qkv = torch.cat([src[f"transformer_blocks.0.attn.to_{p}.weight"] for p in "qkv"])
    codes, scale = quantize_rows(qkv)
    layer = load_baked(baked, CPU).transformer.transformer_blocks[0].attn.to_qkv
    assert torch.equal(layer.weight.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(layer.weight_scale, scale)


def test_baked_fp8_output_close_to_bf16_source(baked):
    from app.families.flux import FAMILY as FLUX

    src = FLUX.build_tiny().transformer.to(torch.bfloat16).float()  # the source as baked (bf16 weights)
    fp8 = load_baked(baked, CPU).transformer
    with torch.no_grad():
        ref, out = src(**transformer_inputs()).sample, fp8(**transformer_inputs()).sample
    err = ((out - ref).norm() / ref.norm()).item()
    # FP8 per-row weights (FP8Linear's CPU path: codes x scale, activations unquantized; the exact
    # codes are checked above); tiny model, measured 0.0034. On the GPU (activations FP8 per row
    # too) the bench measures the full-size model: bench/results/weights_*.json.
    assert 0 < err < 0.02, err


def test_baked_pipeline_generates_through_load_pipeline(baked):
    from app.loading import load_pipeline
    from app.source import resolve
    from preflight import Plan

    source = resolve(str(baked))
    pipe = load_pipeline(source, Plan("cpu", "fp32"))
    assert source.kind == "baked" and source.family.name == FLUX.name and source.tiny
    image = pipe(prompt="a red cat", width=256, height=256, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 256, 256, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_quantize_is_idempotent_on_a_baked_denoiser(baked):
    t = load_baked(baked, CPU).transformer
    before = {k: v.clone() for k, v in t.state_dict().items()}
    modules = {n: type(m) for n, m in t.named_modules()}
    assert quantize_denoiser(t, "fp8", FLUX.skips) == []
    after = t.state_dict()
    assert modules == {n: type(m) for n, m in t.named_modules()} and before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8))
               for k in before)


def test_quantize_denoiser_runs_on_meta_and_matches_the_real_structure():
    """The loader's skeleton: the same function on meta tensors gives the same names, shapes, dtypes."""
    from app.families.flux import FAMILY as FLUX

    real = FLUX.build_tiny().transformer.to(torch.bfloat16)
    with torch.device("meta"):
        meta = type(real).from_config(real.config).to(torch.bfloat16)
    assert quantize_denoiser(real, "fp8", FLUX.skips) == quantize_denoiser(meta, "fp8", FLUX.skips)
    sig = lambda m: {k: (v.dtype, tuple(v.shape)) for k, v in m.state_dict().items()}  # noqa: E731
    assert sig(real) == sig(meta) and all(v.is_meta for v in meta.state_dict().values())


def test_linears_that_scaled_mm_cannot_run_stay_unquantized():
    """torch._scaled_mm needs in/out features multiples of 16: a [24 x 40] linear is left as is."""
    from app.families import Family, Defaults

    net = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 24), torch.nn.Linear(24, 16))
    fam = Family("t", "X", "unet", Defaults(256, 256, 1, 1.0))
    assert quantize_denoiser(net, "fp8", fam.skips) == ["0"]
    assert [type(m).__name__ for m in net] == ["FP8Linear", "Linear", "Linear"]


def test_module_to_dtype_moves_fp8_codes_without_casting_them(baked):
    """A pipeline-wide `.to(torch.bfloat16)` must not turn FP8 codes into numbers."""
    t = load_baked(baked, CPU).transformer
    layer = t.transformer_blocks[0].attn.to_qkv
    codes, scale = layer.weight.clone(), layer.weight_scale.clone()
    t.to(torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn and torch.equal(layer.weight.view(torch.uint8), codes.view(torch.uint8))
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert layer.bias.dtype == layer.out_dtype == torch.bfloat16


def test_bf16_bake_has_no_quantized_layers(tmp_path):
    m = bake("tiny-flux", tmp_path / "b", "bf16", device="cpu")
    assert m["recipe"]["quantized_layers"] == 0
    t = load_baked(tmp_path / "b", CPU).transformer
    assert not any(isinstance(m, FP8Linear) for m in t.modules()) and t.transformer_blocks[0].attn.fused_projections
    assert {v.dtype for v in t.state_dict().values()} == {torch.float32}


def test_fp8_file_into_a_bf16_skeleton_fails_naming_the_tensor(copy):
    """Strict loading: a manifest claiming bf16 over FP8 shards is refused, naming a tensor."""
    m = json.loads((copy / "manifest.json").read_text())
    m["recipe"]["precision"] = "bf16"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match=r"unexpected tensors, the denoiser has no \[.*weight_scale"):
        load_baked(copy, CPU)


def test_missing_tensor_fails_naming_it(copy):
    from safetensors.torch import load_file, save_file

    path = shard(copy)
    tensors = load_file(str(path))
    del tensors["transformer_blocks.0.attn.to_qkv.weight_scale"]
    save_file(tensors, str(path))
    m = json.loads((copy / "manifest.json").read_text())
    m["files"][f"transformer/{path.name}"]["size"] = path.stat().st_size
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match=r"lacks 1 tensors, missing e.g. \['transformer_blocks.0.attn.to_qkv.weight_scale'\]"):
        load_baked(copy, CPU)


def test_truncated_shard_fails_naming_the_file(copy):
    path = shard(copy)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match=rf"{path.name} has \d+ bytes, the manifest says \d+ \(truncated"):
        load_baked(copy, CPU)


def test_truncated_shard_without_manifest_check_fails_in_reader(copy):
    from weights.load import Target, load_denoiser

    path = shard(copy)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match=rf"{path.name}: tensor .* ends at byte .* \(truncated\)"):
        load_denoiser(copy, mf.read(copy), CPU)


def test_a_scale_declared_int32_in_place_is_refused_by_the_loader(copy):
    # Same size, altered header (a float32 scale declared int32): sizes pass, the dtype check does not.
    from tests.weights_fixtures import rewrite_header

    from weights.serialize import INDEX_NAME

    key = "transformer_blocks.0.attn.to_qkv.weight_scale"
    path = copy / "transformer" / json.loads((copy / "transformer" / INDEX_NAME).read_text())["weight_map"][key]
    rewrite_header(path, lambda h: h[key].update(dtype="I32"))
    with pytest.raises(IntegrityError, match=r"to_qkv\.weight_scale is torch\.int32, the denoiser expects torch\.float32"):
        load_baked(copy, CPU)


def test_altered_byte_fails_verify_naming_the_file(copy):
    path = shard(copy)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"{path.name} sha256 .* differs from the manifest's .* \(altered\)"):
        mf.verify(copy)


def test_missing_file_fails(copy):
    (copy / "vae" / "config.json").unlink()
    with pytest.raises(IntegrityError, match="vae/config.json listed in the manifest is missing"):
        mf.verify(copy)


def test_cli_verify_inspect(baked, copy, capsys):
    from weights.__main__ import main

    assert main(["verify", str(baked)]) == 0
    assert main(["inspect", str(baked)]) == 0
    report = json.loads(capsys.readouterr().out.split("\n}\n")[1] + "\n}")
    assert report["quantized_layers"] == 14 and report["dtypes"]["F8_E4M3"] == 14
    assert report["fp8_weights_with_scale"] == 14 and report["unscaled"] == []
    (copy / "model_index.json").write_text("{}")
    assert main(["verify", str(copy)]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_cli_inspect_external_file(tmp_path, capsys):
    from tests.weights_fixtures import rewrite, tiny_transformer, write
    from weights.__main__ import main

    src = tmp_path / "c.safetensors"
    write(src, "comfyui-legacy", tiny_transformer())
    assert main(["inspect", str(src)]) == 0
    ok = json.loads(capsys.readouterr().out)
    assert ok["format"] == "comfyui-legacy" and ok["fp8_weights"] == ok["fp8_weights_with_scale"] == 16
    rewrite(src, lambda t, m: t.pop("model.diffusion_model.double_blocks.0.img_mlp.0.scale_weight"))
    assert main(["inspect", str(src)]) == 2
    bad = json.loads(capsys.readouterr().out)
    assert bad["unscaled"] == ["double_blocks.0.img_mlp.0.weight"] and "refusing" in bad["problem"]


def service(model: str, tmp_path):
    from app.config import Settings
    from app.service import Service

    return Service.load(Settings(model=model, output_uri=str(tmp_path / "out"), preflight=False, device="cpu",
                                 warmup=False, cache_dir=str(tmp_path / "cache")))


def test_service_takes_defaults_from_the_baked_source_not_the_path(baked, tmp_path):
    """MODEL=<baked tiny-flux dir>: the tiny defaults (256x256, 4 steps), as in the container test."""
    svc = service(str(baked), tmp_path)
    assert svc.source.id == "tiny-flux" and svc.family.defaults == FLUX.tiny_defaults
    result = svc.run({"prompt": "a red cat", "seed": 1}, "job-1")
    assert "error" not in result, result
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (256, 256)


def test_a_plain_directory_keeps_the_family_defaults(tmp_path):
    """The control: without a manifest the directory is the source, so FLUX.1's own defaults apply."""
    from app.families.flux import FAMILY as FLUX

    FLUX.build_tiny().save_pretrained(tmp_path / "plain")
    svc = service(str(tmp_path / "plain"), tmp_path)
    assert svc.source.id == str(tmp_path / "plain") and svc.family.defaults == FLUX.defaults


def test_a_v1_manifest_torchao_layout_is_refused_with_the_fix(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["version"] = 1
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match=r"v1 is not diffusion-worker/baked v2 \(re-bake it"):
        load_baked(copy, CPU)


def _fp8_bytes(sd: dict) -> dict:
    """A state dict with FP8 codes viewed as bytes (torch.equal compares e4m3 codes as numbers)."""
    return {k: (v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v) for k, v in sd.items()}


def test_fp8_text_encoders_bake_and_load_bit_for_bit(tmp_path):
    """--text-encoders fp8: the encoders' codes stored as e4m3 (a byte a weight), read back through the
    components' own from_pretrained and swapped back to FP8Linear: the same codes, scales and embeddings
    as quantizing the source in memory (what TEXT_ENCODERS=fp8 does at start)."""
    from safetensors import safe_open

    from weights.quantize import quantize_text_encoder
    from weights.text_fp8 import SCALES, restore

    out = tmp_path / "tiny-fp8-text"
    m = bake("tiny-flux", out, "fp8", device="cpu", text_encoders="fp8")
    layers = m["text_encoders"]["layers"]
    assert m["text_encoders"]["precision"] == "fp8" and set(layers) == {"text_encoder", "text_encoder_2"}
    assert all(layers.values()) and all(f"{n}/{SCALES}" in m["files"] for n in layers)
    with safe_open(str(out / "text_encoder_2" / "model.safetensors"), "pt") as f:
        assert sum(f.get_tensor(k).dtype == torch.float8_e4m3fn for k in f.keys()) == len(layers["text_encoder_2"])
    pipe = load_baked(out, Target("cpu", torch.bfloat16))
    ref = FLUX.tiny_variant().build_tiny().to(torch.bfloat16)
    for name, names in layers.items():
        assert quantize_text_encoder(getattr(ref, name)) == names
        assert quantize_text_encoder(getattr(pipe, name)) == []  # already FP8: TEXT_ENCODERS=fp8 changes nothing
        got, want = (_fp8_bytes(getattr(p, name).state_dict()) for p in (pipe, ref))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    emb = [FLUX.encode(p, "a red fox")["prompt_embeds"] for p in (pipe, ref)]
    assert torch.equal(*emb)
    layers["text_encoder"].append("text_model.no_such_layer")
    with pytest.raises(IntegrityError, match="text_encoder.text_model.no_such_layer is missing"):
        restore(pipe, out, {"text_encoder": layers["text_encoder"][-1:]})


# ---- text encoders and VAE: through weights.reader into their final place -------------------------------

COMPONENT_FILES = ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                   "vae/diffusion_pytorch_model.safetensors"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_components_load_through_the_reader_as_from_pretrained_would(baked, monkeypatch, dtype):
    """CLIP, T5 (tied embeddings, stored once) and the VAE: each file read by weights.reader, and the
    modules equal to what from_pretrained makes of the same folder (names, dtypes, values, buffers)."""
    import importlib

    import weights.load as wl

    read, real = [], wl.read_shards
    monkeypatch.setattr(wl, "read_shards", lambda paths, device, names=None, **kw: (read.extend(names), real(paths, device, names, **kw))[1])
    pipe = load_baked(baked, Target("cpu", dtype))
    assert sorted(read) == sorted([f"transformer/{shard(baked).name}", *COMPONENT_FILES])
    index = json.loads((baked / "model_index.json").read_text())
    for name in ("text_encoder", "text_encoder_2", "vae"):
        library, cls = index[name]
        ref = getattr(importlib.import_module(library), cls).from_pretrained(baked / name, torch_dtype=dtype)
        ours, theirs = getattr(pipe, name).state_dict(), ref.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours), name
        assert all(torch.equal(b, dict(ref.named_buffers())[n]) for n, b in getattr(pipe, name).named_buffers())
        assert not getattr(pipe, name).training
    t5 = pipe.text_encoder_2
    assert t5.encoder.embed_tokens.weight is t5.shared.weight  # tied again, one tensor


def _component_error(root, match):
    from weights.load import load_components

    with pytest.raises(IntegrityError, match=match):
        load_components(root, "transformer", CPU)  # past the manifest's size check: the reader's own


def test_a_truncated_text_encoder_is_refused_naming_the_file(copy):
    path = copy / "text_encoder" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match=r"text_encoder/model\.safetensors has \d+ bytes, the manifest says"):
        load_baked(copy, CPU)  # the manifest's sizes first, as for the denoiser
    _component_error(copy, r"text_encoder/model\.safetensors: tensor .* ends at byte .* \(truncated\)")


def _drop(key):
    return lambda t: t.pop(key)


@pytest.mark.parametrize("file, edit, match", [
    ("vae/diffusion_pytorch_model.safetensors", lambda t: t.update({"decoder.conv_in.bias": torch.zeros(3)}),
     r"vae/diffusion_pytorch_model\.safetensors: tensor decoder\.conv_in\.bias has shape \[3\], "
     r"the vae \(AutoencoderKL\) expects \[\d+\]"),
    ("text_encoder/model.safetensors", _drop("final_layer_norm.weight"),
     r"baked text_encoder \(CLIPTextModel\) lacks 1 tensors, missing e\.g\. \['final_layer_norm\.weight'\]"),
    ("text_encoder_2/model.safetensors", lambda t: t.update({"encoder.not_a_layer.weight": torch.zeros(1)}),
     r"text_encoder_2/model\.safetensors: unexpected tensors, the text_encoder_2 \(T5EncoderModel\) has no "
     r"\['encoder\.not_a_layer\.weight'\]"),
    ("text_encoder/model.safetensors", lambda t: t.update({"final_layer_norm.weight":
                                                            t["final_layer_norm.weight"].to(torch.int32)}),
     r"text_encoder/model\.safetensors: tensor final_layer_norm\.weight is torch\.int32, "
     r"the text_encoder \(CLIPTextModel\) expects torch\.float32"),
], ids=["vae-shape", "clip-missing", "t5-unknown", "clip-int"])
def test_a_wrong_component_tensor_is_refused_naming_it(copy, file, edit, match):
    """The denoiser's refusals, for the other components (the manifest's sizes updated: a consistent bake)."""
    from safetensors.torch import load_file, save_file

    path = copy / file
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    m = json.loads((copy / "manifest.json").read_text())
    m["files"][file]["size"] = path.stat().st_size
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match=match):
        load_baked(copy, CPU)


def test_a_component_named_another_way_is_left_to_from_pretrained(copy):
    """Files whose tensor names are mostly not the module's (transformers 5 renames Qwen2.5-VL's keys on
    load; only from_pretrained knows the mapping) are not refused as damaged: from_pretrained loads them."""
    from safetensors.torch import load_file, save_file

    from tests.conftest import captured_logs
    from weights.load import load_components

    path = copy / "text_encoder" / "model.safetensors"
    save_file({f"legacy.{k}": v for k, v in load_file(str(path)).items()}, str(path))
    with captured_logs("INFO") as lines:
        parts = load_components(copy, "transformer", CPU)
    assert sorted(parts) == ["text_encoder_2", "vae"]
    assert any("text_encoder (CLIPTextModel): its files name tensors another way" in line for line in lines)
