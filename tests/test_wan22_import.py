"""`python -m weights import high=FILE low=FILE --family wan-i2v` on files written as Kijai publishes Wan 2.2
A14B (WanVideo_comfy_fp8_scaled: one file per expert, original Wan names, per-tensor `scale_weight`), from
the tiny Wan 2.2 pipeline's two experts: each file lands in its own transformer (codes kept bit for bit,
within FP8 rounding of its source, never the other expert's), a full pipeline with --base loads and runs,
plain casts are accepted, stripped or missing scales refused naming the tensor and the file, and an
expert the family or the base lacks is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from app.families import FAMILIES
from tests.weights_fixtures import COMFY, write_published, wan_original
from weights import manifest as mf
from weights.__main__ import main
from weights.fp8 import FP8Linear
from weights.load import Target, load_baked, load_denoiser

FAM = FAMILIES["wan-i2v"]
CPU = Target("cpu", torch.float32)
EXPERTS = {"high": "transformer", "low": "transformer_2"}


def randomized(pipe):
    """Both experts with weights large enough to matter, a different draw each (bf16, as published)."""
    for seed, attr in enumerate(EXPERTS.values(), start=1):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in getattr(pipe, attr).parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pipe.to(torch.bfloat16)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(the tiny Wan 2.2 pipeline, its diffusers folder for --base, the transformer config.json)."""
    root = tmp_path_factory.mktemp("wan22-src")
    pipe = randomized(FAM.build_tiny_a14b())
    pipe.save_pretrained(root / "base")
    return pipe, root / "base", root / "base" / "transformer" / "config.json"


def published(tmp_path, pipe, style: str, styles: dict | None = None) -> dict:
    """{expert key: (file, {original weight name: (codes, scale)})}: one Kijai-style file per expert."""
    out = {}
    for key, attr in EXPERTS.items():
        sd = {wan_original(k): v.detach() for k, v in getattr(pipe, attr).state_dict().items()}
        path = tmp_path / f"Wan2_2-I2V-A14B-{key.upper()}_fp8_e4m3fn_scaled_KJ.safetensors"
        out[key] = (path, write_published(path, sd, (styles or {}).get(key, style)))
    return out


def run_import(files: dict, out, *extra) -> int:
    return main(["import", *(f"{k}={p}" for k, (p, _) in files.items()), "--family", "wan-i2v",
                 "--out", str(out), *extra])


def dequantized(model) -> dict[str, torch.Tensor]:
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    return {**{n: t.float() for n, t in model.state_dict().items() if not n.endswith(".weight_scale")},
            **{f"{n}.weight": m.weight.float() * m.weight_scale for n, m in fp8.items()}}


def close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool(((got - ref).abs() <= ref.abs() * 2 ** -4 + ref.abs().max() * 2 ** -9 + 2 ** -9).all())


@pytest.mark.parametrize("style", ["scaled", "plain-cast"])
def test_each_experts_file_lands_in_its_own_transformer(tmp_path, source, style):
    pipe, _, cfg = source
    files = published(tmp_path, pipe, style)
    out = tmp_path / "imported"
    assert run_import(files, out, "--config", str(cfg)) == 0
    m = mf.read(out)
    assert m["denoiser"] == "transformer" and m["extra_denoisers"] == ["transformer_2"] and not m["complete"]
    assert m["source"]["id"] == files["high"][0].name
    fmt = "fp8-unscaled" if style == "plain-cast" else "comfyui-legacy"
    for key, attr in EXPERTS.items():
        assert m["sources"][attr]["id"] == files[key][0].name and m["sources"][attr]["expert"] == key
        assert m["sources"][attr]["format"] == fmt
    by = m["recipe"]["quantized_by_denoiser"]
    assert by["transformer"] == by["transformer_2"] > 0 and m["recipe"]["requantized_per_row"] == 0
    for key, attr in EXPERTS.items():
        model = load_denoiser(out, m, CPU, name=attr)[0]
        got, mine = dequantized(model), getattr(pipe, attr).state_dict()
        other = getattr(pipe, EXPERTS["low" if key == "high" else "high"]).state_dict()
        assert got.keys() == mine.keys()
        assert all(close(got[n], mine[n].float()) for n in mine), attr
        assert not all(close(got[n], other[n].float()) for n in other)  # the other expert's would not pass
        for name, (codes, _) in files[key][1].items():  # the published codes, kept bit for bit
            layer = [n for n in mine if wan_original(n) == name][0].removesuffix(".weight")
            assert torch.equal(model.get_submodule(layer).weight.view(torch.uint8), codes.view(torch.uint8))


def test_with_base_both_experts_load_as_fp8_and_the_pipeline_runs(tmp_path, source):
    from app.families.base import synthetic_image
    from app.schema import parse_job

    pipe, base, cfg = source
    files = published(tmp_path, pipe, "scaled")
    out = tmp_path / "full"
    assert run_import(files, out, "--config", str(cfg), "--base", str(base)) == 0
    assert mf.read(out)["complete"] and mf.verify(out)["ok"]
    loaded = load_baked(out, CPU)
    assert all(sum(isinstance(x, FP8Linear) for x in getattr(loaded, a).modules()) > 0 for a in EXPERTS.values())
    assert loaded.config.boundary_ratio == 0.9
    fam = FAM.tiny_variant("a14b")
    job = parse_job({"prompt": "a red sneaker turns", "image": "data:image/png;base64,", "num_frames": 5,
                     "width": 64, "height": 64, "seed": 0}, fam)
    (video,) = fam.generate(loaded, job, images=[synthetic_image(64, 64)])
    assert video.shape == (5, 64, 64, 3) and video.std() > 0


@pytest.mark.parametrize("styles, tensor", [
    ({"low": "stripped"}, "blocks.0.self_attn.q.weight"),  # a scaled file whose scales were stripped
    ({"low": "one-missing"}, "blocks.1.ffn.2.weight"),  # a scaled file with one layer's scale gone
])
def test_a_missing_scale_in_one_experts_file_is_refused_naming_tensor_and_file(tmp_path, source, capsys, styles,
                                                                                tensor):
    pipe, _, cfg = source
    files = published(tmp_path, pipe, "scaled", {k: "stripped" if v == "stripped" else "scaled"
                                                 for k, v in styles.items()})
    if styles["low"] == "one-missing":
        from tests.weights_fixtures import rewrite

        rewrite(files["low"][0], lambda t, meta: t.pop(COMFY + tensor.replace(".weight", ".scale_weight")))
    out = tmp_path / "imported"
    assert run_import(files, out, "--config", str(cfg)) == 2
    err = json.loads(capsys.readouterr().err)
    assert err["error"] == "missing_scale", err
    assert files["low"][0].name in err["message"] and "model.diffusion_model.blocks." in err["message"], err
    if styles["low"] == "one-missing":
        assert COMFY + tensor in err["message"]
    assert not out.exists() and not list(tmp_path.glob("imported*"))


@pytest.mark.parametrize("args, words", [
    (["mid={high}"], ["no expert 'mid'", "high, low"]),
    (["{high}", "--base", "{base}"], ["holds 2 denoisers", "high=FILE", "low=FILE"]),
    (["high={high}", "--base", "{base}"], ["no file for transformer_2 (expert 'low')"]),
    (["low={low}"], ["no file for transformer (expert 'high')"]),
    (["high={high}", "high={low}"], ["a second file for transformer"]),
])
def test_an_expert_the_family_or_base_lacks_is_refused_by_name(tmp_path, source, capsys, args, words):
    pipe, base, cfg = source
    files = published(tmp_path, pipe, "scaled")
    paths = {"high": files["high"][0], "low": files["low"][0], "base": base}
    rc = main(["import", *(a.format(**paths) for a in args), "--family", "wan-i2v", "--out",
               str(tmp_path / "o"), "--config", str(cfg)])
    err = json.loads(capsys.readouterr().err)
    assert rc == 2 and err["error"] == "unknown_expert" and all(w in err["message"] for w in words), err
    assert not (tmp_path / "o").exists()


def test_a_wan21_base_has_no_low_noise_expert(tmp_path, source, capsys):
    pipe, _, cfg = source
    files = published(tmp_path, pipe, "scaled")
    wan21 = tmp_path / "wan21"
    FAM.build_tiny().save_pretrained(wan21)
    capsys.readouterr()  # save_pretrained's progress bars
    assert run_import(files, tmp_path / "o", "--config", str(cfg), "--base", str(wan21)) == 2
    err = json.loads(capsys.readouterr().err)
    assert "has no transformer_2 (expert 'low')" in err["message"], err
