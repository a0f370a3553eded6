"""Bake -> load -> verify round trips on the tiny FLUX pipeline, and each failure mode's message."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from app.families import FLUX
from app.plan import Plan
from weights import manifest as mf
from weights.bake import bake
from weights.errors import IntegrityError
from weights.load import load_baked
from weights.quantize import is_quantized, quantize_denoiser

CPU = Plan("cpu", "fp32")


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


def test_baked_structure_follows_the_skip_list(baked):
    t = load_baked(baked, CPU).transformer
    for name, mod in t.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert is_quantized(mod.weight) != FLUX.skips(name), name
    attn = t.single_transformer_blocks[0].attn
    assert attn.fused_projections and not hasattr(attn, "to_q") and attn.to_qkv.weight.qdata.dtype == torch.float8_e4m3fn
    assert t.x_embedder.weight.dtype == torch.float32  # plan dtype for high-precision layers


def test_baked_fp8_output_close_to_bf16_source(baked):
    from app.tiny import build_tiny_flux

    src = build_tiny_flux().transformer.to(torch.bfloat16).float()  # the source as baked (bf16 weights)
    fp8 = load_baked(baked, CPU).transformer
    with torch.no_grad():
        ref, out = src(**transformer_inputs()).sample, fp8(**transformer_inputs()).sample
    err = ((out - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.02, err  # FP8 weights and activations, tiny model; measured 0.0047


def test_baked_pipeline_generates_through_load_pipeline(baked):
    from app.pipeline import load_pipeline

    pipe, family = load_pipeline(str(baked), CPU)
    assert family is FLUX
    image = pipe(prompt="a red cat", width=256, height=256, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 256, 256, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_quantize_is_idempotent_on_a_baked_denoiser(baked):
    t = load_baked(baked, CPU).transformer
    before = {n: p.qdata.clone() for n, p in t.named_parameters() if is_quantized(p)}
    assert quantize_denoiser(t, FLUX, "fp8") == []
    after = {n: p.qdata for n, p in t.named_parameters() if is_quantized(p)}
    assert before.keys() == after.keys() and all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)


def test_bf16_bake_has_no_quantized_layers(tmp_path):
    m = bake("tiny-flux", tmp_path / "b", "bf16", device="cpu")
    assert m["recipe"]["quantized_layers"] == 0
    t = load_baked(tmp_path / "b", CPU).transformer
    assert not any(is_quantized(p) for p in t.parameters()) and t.transformer_blocks[0].attn.fused_projections


def test_truncated_shard_fails_naming_the_file(copy):
    path = shard(copy)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match=rf"{path.name} has \d+ bytes, the manifest says \d+ \(truncated"):
        load_baked(copy, CPU)


def test_truncated_shard_without_manifest_check_fails_in_reader(copy):
    from weights.serialize import tensors_from_buffer

    data = bytearray(shard(copy).read_bytes()[:-100])
    with pytest.raises(IntegrityError, match="ends at byte .* \\(truncated\\)"):
        tensors_from_buffer(data, "x.safetensors")


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
