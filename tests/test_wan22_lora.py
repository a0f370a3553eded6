"""`python -m weights bake --fuse-lora high=FILE --fuse-lora low=FILE` on the tiny Wan 2.2 A14B
(MODEL=tiny-wan-i2v-a14b): each expert's LoRA, written as lightx2v publishes them (original Wan names,
`lora_down` / `lora_up` / `alpha`), is fused into its own transformer before FP8; the baked weights equal
W + scale * alpha / rank * up @ down computed here without diffusers or peft, within bf16 + FP8 rounding;
the manifest records both; the bake's few-step defaults are what a job runs; an expert the family or
the model lacks is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.config import Settings
from app.families import FAMILIES
from weights import manifest as mf
from weights.__main__ import main
from weights.lora import sha256

FAM = FAMILIES["wan-i2v"]
MODEL = "tiny-wan-i2v-a14b"
# (original Wan name, diffusers name) of the layers each LoRA adapts, in both blocks
LAYERS = [("self_attn.q", "attn1.to_q"), ("self_attn.o", "attn1.to_out.0"), ("cross_attn.k", "attn2.to_k"),
          ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2")]
RANK, ALPHA = 4, 2.0
SCALES = {"high": 0.75, "low": 0.5}


def lightx2v_lora(path, seed: int) -> dict:
    """A LoRA in lightx2v's Wan2.2-I2V-A14B layout; returns {diffusers layer: (delta at scale 1, |up| @ |down|
    at scale 1: what bounds the bf16 rounding of the factors)}."""
    ref = FAM.build_tiny_a14b().transformer
    g = torch.Generator().manual_seed(seed)
    state, deltas = {}, {}
    for block in (0, 1):
        for orig, name in LAYERS:
            lin = ref.get_submodule(f"blocks.{block}.{name}")
            down = torch.randn(RANK, lin.in_features, generator=g) * 0.5
            up = torch.randn(lin.out_features, RANK, generator=g) * 0.5
            key = f"diffusion_model.blocks.{block}.{orig}"
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                          f"{key}.alpha": torch.tensor(ALPHA)})
            deltas[f"blocks.{block}.{name}"] = (ALPHA / RANK * up @ down, ALPHA / RANK * up.abs() @ down.abs())
    save_file(state, str(path))
    return deltas


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {k: (d / f"wan22-{k}_noise.safetensors", lightx2v_lora(d / f"wan22-{k}_noise.safetensors", seed))
            for k, seed in (("high", 1), ("low", 2))}


@pytest.fixture(scope="module")
def baked(loras, tmp_path_factory):
    out = tmp_path_factory.mktemp("bake") / "wan22-lora"
    args = ["bake", "--model", MODEL, "--out", str(out), "--device", "cpu", "--steps", "3", "--guidance", "1",
            "--fuse-lora", f"high={loras['high'][0]}", "--fuse-lora", f"low={loras['low'][0]}",
            "--lora-scale", str(SCALES["high"]), "--lora-scale", f"low={SCALES['low']}"]
    assert main(args) == 0
    return out


def baked_weights(root, folder: str) -> dict[str, torch.Tensor]:
    """{layer: fp32 weight} of a baked denoiser's FP8 layers: e4m3 codes x per-row scale, read directly."""
    out = {}
    for f in sorted((root / folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys = set(st.keys())
            for k in keys:
                if k.endswith(".weight_scale"):
                    layer = k.removesuffix(".weight_scale")
                    out[layer] = st.get_tensor(f"{layer}.weight").float() * st.get_tensor(k)
    return out


def within_fp8(got: torch.Tensor, want: torch.Tensor, factors: torch.Tensor) -> bool:
    """e4m3 keeps 3 mantissa bits (relative 2^-4) above its subnormals (row max x 2^-9); the fused weight
    is bf16 (2^-8), and so are the LoRA factors the fuse multiplies (2^-8 each, of |up| @ |down|)."""
    rowmax = want.abs().amax(1, keepdim=True)
    bound = want.abs() * (2 ** -4 + 2 ** -8) + rowmax * 2 ** -9 + factors * 2 ** -7 + 1e-6
    return bool(((got - want).abs() <= bound).all())


def test_each_experts_lora_is_fused_into_its_own_transformer_within_fp8_rounding(baked, loras):
    source = FAM.build_tiny_a14b().to(torch.bfloat16)  # the source as the bake read it
    for key, attr in (("high", "transformer"), ("low", "transformer_2")):
        other = "low" if key == "high" else "high"
        got = baked_weights(baked, attr)
        plain = {n: m.weight.float() for n, m in getattr(source, attr).named_modules() if n in loras[key][1]}
        assert set(plain) <= set(got) and len(plain) == 2 * len(LAYERS)
        for name, w in plain.items():
            delta, factors = (t * SCALES[key] for t in loras[key][1][name])
            assert within_fp8(got[name], w + delta, factors), (attr, name)
            # the LoRA matters at this tolerance, and the other expert's would not pass for it
            assert not within_fp8(got[name], w, factors), (attr, name)
            wrong, wrong_factors = (t * SCALES[other] for t in loras[other][1][name])
            assert not within_fp8(got[name], w + wrong, factors + wrong_factors), (attr, name)


def test_manifest_records_both_loras_and_the_defaults(baked, loras):
    m = mf.read(baked)
    assert "lora" not in m and m["extra_denoisers"] == ["transformer_2"]
    for key, attr in (("high", "transformer"), ("low", "transformer_2")):
        path = loras[key][0]
        assert m["lora_by_expert"][key] == {"file": path.name, "sha256": sha256(path), "scale": SCALES[key],
                                            "layers": 2 * len(LAYERS), "denoiser": attr}
    assert m["defaults"] == {"steps": 3, "guidance": 1.0}
    assert mf.verify(baked)["ok"]


def test_a_job_that_sets_nothing_runs_the_bakes_few_step_defaults(baked, tmp_path):
    from tests.test_wan22 import png_uri
    from app.service import Service

    svc = Service.load(Settings(model=str(baked), output_uri=str(tmp_path), preflight=False, device="cpu",
                                warmup=False))
    assert (svc.family.defaults.steps, svc.family.defaults.guidance) == (3, 1.0)
    calls = {"transformer": 0, "transformer_2": 0}
    for n in calls:
        getattr(svc.pipe, n).register_forward_pre_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
    steps = []
    result = svc.run({"prompt": "a red sneaker turns", "image": png_uri(), "num_frames": 5, "seed": 1}, "job-1",
                     progress=lambda s, n: steps.append((s, n)))
    assert "error" not in result, result
    assert steps == [(1, 3), (2, 3), (3, 3)]
    # guidance 1: one forward per step (no CFG pass), and both experts run across the boundary
    assert sum(calls.values()) == 3 and all(calls.values()), calls


@pytest.mark.parametrize("model, flags, words", [
    (MODEL, ["--fuse-lora", "mid={high}"], ["no expert 'mid'", "high, low"]),
    (MODEL, ["--fuse-lora", "{high}"], ["holds 2 denoisers", "--fuse-lora high=FILE --fuse-lora low=FILE"]),
    (MODEL, ["--fuse-lora", "low={high}", "--fuse-lora", "low={low}"], ["a second file for transformer_2"]),
    (MODEL, ["--fuse-lora", "high={high}", "--lora-scale", "low=2"], ["--lora-scale low=2", "no --fuse-lora low"]),
    ("tiny-wan-i2v", ["--fuse-lora", "low={low}"], ["has no transformer_2 (expert 'low')"]),
    ("tiny-flux", ["--fuse-lora", "high={high}"], ["flux family has no expert 'high'", "one denoiser"]),
])
def test_an_expert_the_family_or_model_lacks_is_refused_by_name(loras, tmp_path, capsys, model, flags, words):
    paths = {k: str(p) for k, (p, _) in loras.items()}
    rc = main(["bake", "--model", model, "--out", str(tmp_path / "out"), "--precision", "bf16", "--device", "cpu",
               *(f.format(**paths) for f in flags)])
    err = json.loads(capsys.readouterr().err)
    assert rc == 2 and err["error"] == "unknown_expert", err
    assert all(w in err["message"] for w in words), err["message"]
    assert not (tmp_path / "out").exists()


def test_the_one_file_form_still_fuses_a_single_denoiser_model(tmp_path, loras):
    """Wan 2.1 (one transformer): a bare --fuse-lora FILE goes into it, recorded as `lora`."""
    from weights.__main__ import bake

    m = bake("tiny-wan-i2v", tmp_path / "wan21", "bf16", device="cpu", lora=[str(loras["high"][0])])
    # diffusers adds zero add_k_proj / add_v_proj factors to a LoRA without them for Wan 2.1's image K/V
    assert m["lora"]["layers"] == 2 * (len(LAYERS) + 2) and m["lora"]["scale"] == 1.0 and "lora_by_expert" not in m
