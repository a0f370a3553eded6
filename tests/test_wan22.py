"""Wan 2.2 I2V A14B's two experts through bake -> load -> Service.run, on its tiny random pipeline
(MODEL=tiny-wan-i2v-a14b: real WanImageToVideoPipeline with transformer, transformer_2 and
boundary_ratio): both experts are quantized and written, loaded into FP8 skeletons, give the frames
of the in-memory FP8 pipeline, and the family's warm-up job runs both."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from app.config import Settings
from app.families import FAMILIES
from app.families.base import synthetic_image
from weights import manifest as mf
from weights.fp8 import FP8Linear

FAM = FAMILIES["wan-i2v"]
EXPERTS = ("transformer", "transformer_2")


def png_uri(w=64, h=64) -> str:
    buf = io.BytesIO()
    synthetic_image(w, h).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


MODEL = "tiny-wan-i2v-a14b"
JOB = {"prompt": "a red sneaker turns", "image": png_uri(), "num_frames": 5, "seed": 3}  # 64x64, 2 steps


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The FP8 bake of the tiny Wan 2.2 pipeline by `python -m weights bake`."""
    from weights.__main__ import main as weights_main

    out = tmp_path_factory.mktemp("wan22") / "baked"
    assert weights_main(["bake", "--model", MODEL, "--out", str(out), "--device", "cpu"]) == 0
    return out


def fp8_layers(module) -> int:
    return sum(isinstance(m, FP8Linear) for m in module.modules())


def service(model: str, tmp_path, loader=None):
    from app.loading import load_pipeline
    from app.service import Service

    return Service.load(Settings(model=model, output_uri=str(tmp_path / "out"), preflight=False, device="cpu",
                                 warmup=False, cache_dir=str(tmp_path / "cache")), loader=loader or load_pipeline)


def test_bake_quantizes_and_writes_both_experts(models):
    baked = models
    m = mf.read(baked)
    assert m["denoiser"] == "transformer" and m["extra_denoisers"] == ["transformer_2"]
    by = m["recipe"]["quantized_by_denoiser"]
    assert by["transformer"] == by["transformer_2"] > 0 and m["recipe"]["quantized_layers"] == 2 * by["transformer"]
    for name in EXPERTS:  # each expert as FP8 shards, not a bf16 save_pretrained folder
        shards = [f for f in m["files"] if f.startswith(name + "/") and f.endswith(".safetensors")]
        assert shards and all(f.split("/")[1].startswith("diffusion_pytorch_model") for f in shards)
        from safetensors import safe_open

        with safe_open(str(baked / shards[0]), "pt") as f:
            assert any(f.get_slice(k).get_dtype() == "F8_E4M3" for k in f.keys())


def test_baked_job_equals_the_in_memory_fp8_pipeline(models, tmp_path, monkeypatch):
    """MODEL=<bake>: both experts load as FP8; a job's frames equal those of the source pipeline with
    both experts quantized in memory (the same FP8 arithmetic: the bake loses nothing more), and
    stay within FP8 rounding of the unquantized source."""
    import app.video
    from app.loading import load_pipeline
    from weights.quantize import quantize_denoiser

    baked = models
    frames = []
    encode = app.video.encode_video
    monkeypatch.setattr(app.video, "encode_video", lambda f, job: frames.append(f) or encode(f, job))

    svc = service(str(baked), tmp_path / "b")
    assert all(fp8_layers(getattr(svc.pipe, n)) > 0 for n in EXPERTS)
    assert svc.pipe.config.boundary_ratio == 0.9 and svc.source.id == MODEL and svc.family.tiny_model == "a14b"
    result = svc.run(JOB, "job-baked")
    assert "error" not in result, result
    video = result["videos"][0]
    assert (video["width"], video["height"], video["frames"]) == (64, 64, 5) and video["bytes"] > 0

    def quantized_in_memory(source, plan, cache_dir):
        """The source as the bake saw it (every weight rounded to bf16, the constructor-computed RoPE
        tables not: they are in no file), both experts quantized here, in the plan's fp32."""
        pipe = load_pipeline(source, plan, cache_dir)
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                computed = {(id(m), n): b.clone() for m in component.modules() for n, b in m._buffers.items()
                            if n in m._non_persistent_buffers_set and b is not None}
                component.to(torch.bfloat16)
                if name in EXPERTS:
                    quantize_denoiser(component, "fp8", FAM.skips, fuse=FAM.fuse_qkv)
                component.to(torch.float32)
                for m in component.modules():
                    for n in list(m._buffers):
                        if (id(m), n) in computed:
                            m._buffers[n] = computed[id(m), n]
        return pipe

    assert "error" not in service(MODEL, tmp_path / "q", quantized_in_memory).run(JOB, "job-q")
    assert "error" not in service(MODEL, tmp_path / "s").run(JOB, "job-src")
    baked_frames, fp8_frames, src_frames = frames
    assert np.array_equal(baked_frames, fp8_frames)
    diff = np.abs(baked_frames.astype(int) - src_frames.astype(int))
    assert 0 < diff.mean() < 2.0 and diff.max() < 64, (diff.mean(), diff.max())


def test_warmup_job_runs_both_experts(models):
    """The family's warm-up job (2 steps) crosses boundary_ratio 0.9: each expert runs, so each is
    compiled before the first job."""
    from app.optimize import warmup
    from weights.load import Target, load_baked

    pipe = load_baked(models, Target("cpu", torch.float32))
    calls = {n: 0 for n in EXPERTS}
    for n in EXPERTS:
        getattr(pipe, n).register_forward_pre_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
    fam = FAM.tiny_variant("a14b")
    warmup(pipe, fam, fam.warmup_jobs(fam.shapes))
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0, calls


def test_s3_stream_loads_both_experts_as_the_local_load(models, bucket, tmp_path):
    """WEIGHTS_URI: both experts' shards streamed (hash-checked) into their FP8 skeletons, tensor for
    tensor the local load's."""
    from app.storage import describe_s3_error, s3_client
    from tests.test_weights_stream import upload
    from weights.load import Target, load_baked
    from weights.stream import WORKERS, read_manifest, stream_baked

    upload(models, bucket, "wan22")
    client = s3_client(max_pool_connections=WORKERS)
    manifest = read_manifest(client, bucket, "wan22", describe_s3_error)
    target = Target("cpu", torch.float32)
    streamed = stream_baked(client, bucket, "wan22", manifest, target, tmp_path / "cache", describe_s3_error)
    local = load_baked(models, target)
    for name in EXPERTS:
        got, want = getattr(streamed, name).state_dict(), getattr(local, name).state_dict()
        assert fp8_layers(getattr(streamed, name)) > 0 and got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name
    # transformer_2's shards came through the checked stream, not as plain downloads into the cache
    assert not list((tmp_path / "cache").rglob("transformer_2/*.safetensors"))


def test_recipe_quantizes_both_experts_of_an_unbaked_pipeline():
    """A hub / folder Wan 2.2 (not baked): the worker's recipe (FP8 here; compile and attention take the
    same path per expert) reaches transformer_2 too."""
    from app.optimize import Recipe, apply_recipe

    pipe = FAM.build_tiny_a14b()
    applied = apply_recipe(pipe, FAM, Recipe(quantize="fp8"))
    assert {"quantize", "transformer_2.quantize"} <= set(applied)
    assert fp8_layers(pipe.transformer) == fp8_layers(pipe.transformer_2) > 0
