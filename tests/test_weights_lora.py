"""`python -m weights bake --fuse-lora FILE [--lora-scale S] [--steps N --guidance G]` on tiny FLUX:
the baked model equals the unbaked one with the LoRA applied by diffusers (bf16 tightly, FP8 within
its rounding), a LoRA for another model is refused naming the file, and the bake's defaults are what
a job that sets nothing runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from app.config import Settings
from app.families.flux import FAMILY as FLUX
from weights import manifest as mf
from weights.__main__ import bake, main
from weights.errors import WeightsError
from weights.load import Target, load_baked
from weights.lora import sha256
from tests import helpers_flux
from tests.helpers_flux import rel

CPU = Target("cpu", torch.float32)
TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.0.proj", "single_transformer_blocks.1.proj_mlp")
SCALE = 0.75


def tiny_lora(path, targets=TARGETS, rank=4, seed=0):
    """A peft-format LoRA (diffusers' `transformer.<module>.lora_A/B.weight` keys) for FLUX's tiny layers."""
    ref = FLUX.build_tiny().transformer
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in targets:
        mod = ref.get_submodule(name) if name in dict(ref.named_modules()) else torch.nn.Linear(32, 32)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.3
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.3
    save_file(state, str(path))
    return path


def forward(transformer):
    return helpers_flux.forward(transformer, seed=3)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return tiny_lora(tmp_path_factory.mktemp("lora") / "tiny-lightning.safetensors")


@pytest.fixture(scope="module")
def reference(lora_file):
    """(without, with) the LoRA applied by diffusers, unfused, at SCALE, on the bf16 source weights."""
    from safetensors.torch import load_file

    pipe = FLUX.build_tiny().to(torch.bfloat16).to(torch.float32)  # the source as the bake reads it
    plain = forward(pipe.transformer)
    pipe.load_lora_weights(load_file(str(lora_file)), adapter_name="ref")
    pipe.set_adapters(["ref"], [SCALE])
    return plain, forward(pipe.transformer)


@pytest.fixture(scope="module")
def baked_bf16(lora_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bake") / "lora-bf16"
    bake("tiny-flux", out, "bf16", device="cpu", lora=str(lora_file), lora_scale=SCALE, steps=2, guidance=1.5)
    return out


def test_bf16_bake_equals_the_lora_applied_in_diffusers(baked_bf16, reference):
    plain, with_lora = reference
    out = forward(load_baked(baked_bf16, CPU).transformer)
    assert rel(plain, with_lora) > 0.05  # the LoRA matters: a bake that dropped it would fail below
    assert rel(out, with_lora) < 5e-3  # only the bf16 rounding of W + S * B @ A


def test_fp8_bake_equals_it_within_fp8_rounding(lora_file, reference, tmp_path):
    plain, with_lora = reference
    bake("tiny-flux", tmp_path / "lora-fp8", "fp8", device="cpu", lora=str(lora_file), lora_scale=SCALE)
    out = forward(load_baked(tmp_path / "lora-fp8", CPU).transformer)
    assert rel(out, with_lora) < 0.02 < rel(plain, with_lora)  # FP8 per-row weights: about 0.003 on this model


def test_manifest_records_the_lora_and_the_defaults(baked_bf16, lora_file):
    m = mf.read(baked_bf16)
    assert m["lora"] == {"file": "tiny-lightning.safetensors", "sha256": sha256(lora_file), "scale": SCALE,
                         "layers": len(TARGETS)}
    assert m["defaults"] == {"steps": 2, "guidance": 1.5}
    assert mf.verify(baked_bf16)["ok"]


def test_a_job_that_sets_nothing_runs_the_bakes_defaults(baked_bf16, tmp_path):
    from app.service import Service

    svc = Service.load(Settings(model=str(baked_bf16), output_uri=str(tmp_path), preflight=False, device="cpu",
                                warmup=False))
    assert (svc.family.defaults.steps, svc.family.defaults.guidance) == (2, 1.5)
    assert (svc.family.defaults.width, svc.family.defaults.height) == (256, 256)  # the rest stays the family's
    steps = []
    result = svc.run({"prompt": "a red cat", "seed": 1}, "job-1", progress=lambda s, n: steps.append((s, n)))
    assert "error" not in result, result
    assert steps == [(1, 2), (2, 2)]


def test_a_bake_without_defaults_keeps_the_familys(tmp_path, lora_file):
    m = bake("tiny-flux", tmp_path / "lora-only", "bf16", device="cpu", lora=str(lora_file))
    assert "defaults" not in m and m["lora"]["scale"] == 1.0


def test_a_lora_for_another_model_is_refused_naming_the_file(tmp_path, capsys):
    other = tiny_lora(tmp_path / "sdxl-style.safetensors", targets=("down_blocks.0.attentions.0.proj_in",))
    rc = main(["bake", "--model", "tiny-flux", "--out", str(tmp_path / "out"), "--precision", "bf16",
               "--device", "cpu", "--fuse-lora", str(other)])
    err = json.loads(capsys.readouterr().err)
    assert rc == 2 and "sdxl-style.safetensors" in err["message"] and "targets no layer" in err["message"], err
    assert not (tmp_path / "out").exists()


def test_a_lora_partly_for_another_model_is_refused(tmp_path):
    mixed = tiny_lora(tmp_path / "mixed.safetensors", targets=(TARGETS[0], "no_such_block.proj"))
    with pytest.raises(WeightsError, match=r"mixed\.safetensors.*(only 1 of its 2 layers|does not fit)"):
        bake("tiny-flux", tmp_path / "out", "bf16", device="cpu", lora=str(mixed))


@pytest.mark.parametrize("content, words", [(None, "no such file"), (b"not safetensors", "not a readable"),
                                            ({"x.weight": torch.ones(2)}, "no LoRA tensors")])
def test_unreadable_lora_files_are_refused_naming_them(tmp_path, content, words):
    path = tmp_path / "bad.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        save_file(content, str(path))
    with pytest.raises(WeightsError, match=words) as e:
        bake("tiny-flux", tmp_path / "out", "bf16", device="cpu", lora=str(path))
    assert "bad.safetensors" in e.value.message


def test_defaults_flags_are_bounded(tmp_path, capsys):
    for flag, value in (("--steps", "0"), ("--guidance", "-1")):
        with pytest.raises(SystemExit):
            main(["bake", "--model", "tiny-flux", "--out", str(tmp_path / "o"), flag, value])
        assert "is not between" in capsys.readouterr().err
