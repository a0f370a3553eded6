"""The latency bench's plumbing (stock vs ours, fidelity, JSON, plot, CLI) on the tiny models on CPU.

The GPU figures in bench/results come from the same code with the full-size builders; here the tiny
builders, 64x64 and 2 steps make it run in seconds. The full-size denoiser inputs are checked on
meta-device models: same shapes and same random stream as the H100 runs used.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from app.families.flux import FAMILY as FLUX

from app.families.sdxl import FAMILY as SDXL

ROOT = Path(__file__).resolve().parents[1]
TINY = {"flux": FLUX.build_tiny, "sdxl": SDXL.build_tiny}
FIGURES = ("e2e_s", "denoise_s", "per_step_ms", "encode_s", "vae_decode_s")


def _results_snapshot():
    return {p.name: p.stat().st_mtime_ns for p in (ROOT / "bench" / "results").iterdir()}


@pytest.fixture(scope="module")
def latency_run(tmp_path_factory):
    """One in-process `bench.latency.main` over both tiny models into a temporary folder."""
    from bench.latency import main

    out = tmp_path_factory.mktemp("bench-out")
    before = _results_snapshot()
    mp = pytest.MonkeyPatch()
    mp.delenv("OUT", raising=False)  # a set $OUT would receive a copy
    try:
        res = main(("flux", "sdxl"), compile_mode="off", attention="native", out_dir=str(out), builders=TINY,
                   size=64, steps=2, reps=2)
    finally:
        mp.undo()
    return res, out, before


@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_stock_and_ours_figures(latency_run, name):
    res, _, _ = latency_run
    r = res[name]
    assert "error" not in r, r.get("error")
    for side in ("stock", "ours"):
        for k in FIGURES:
            assert r[side][k] > 0, (side, k)
        assert r[side]["per_step_ms"] == round(1000 * r[side]["denoise_s"] / 2, 1)
        assert len(r[side]["e2e_all"]) == 2 and r[side]["finite"] is True
        assert r[side]["peak_GiB"] is None  # no CUDA here: no memory figures, not zeros
    graphs = name == "sdxl"  # the family's default, as the worker applies it when CUDA_GRAPHS is unset
    assert r["recipe"] == {"fuse_qkv": True, "quantize": "fp8", "attention": "native",
                           "compile": "off", "dynamic": "auto", "cuda_graphs": graphs,
                           "fuse_gelu_quant": True, "lora_rank": 0}
    assert list(r["ours"]["apply_ms"]) == ["fuse_qkv", "quantize"] + ["cuda_graphs"] * graphs
    # On a CPU the graphed denoiser passes calls straight through: replay and plain runs must agree.
    assert r["ours"].get("graph_vs_plain_rel_err") == (0.0 if graphs else None)
    assert r["ratio_e2e"] == round(r["stock"]["e2e_s"] / r["ours"]["e2e_s"], 2)
    assert r["ratio_per_step"] == round(r["stock"]["per_step_ms"] / r["ours"]["per_step_ms"], 2)
    # Fidelity of the denoiser step: the recipe did quantize (not zero), within FP8's few-percent bound.
    assert 1e-4 < r["ours"]["rel_err_vs_stock"] < 0.03
    assert r["ours"]["fidelity_ok"] is True and r["ours"]["fidelity_bound"] == 0.15
    assert "profile" not in r  # the profiler's kernel breakdown is a CUDA measurement


def test_json_and_plot_written_to_the_given_folder_only(latency_run):
    res, out, before = latency_run
    assert res["size"] == 64 and res["shape"] == "64x64, batch 1" and res["versions"]["gpu"].startswith("cpu")
    slug = res["versions"]["gpu"].replace(" ", "-").lower()
    assert sorted(p.name for p in out.iterdir()) == [f"latency_{slug}.json", f"latency_{slug}.png"]
    assert json.loads((out / f"latency_{slug}.json").read_text()) == json.loads(json.dumps(res))
    with Image.open(out / f"latency_{slug}.png") as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 100
    assert _results_snapshot() == before  # bench/results (the H100 figures) untouched


def test_a_failing_model_keeps_the_other_models_figures(tmp_path, monkeypatch):
    from bench.latency import main

    def broken():
        raise RuntimeError("no weights today")

    monkeypatch.delenv("OUT", raising=False)
    res = main(("sdxl", "flux"), compile_mode="off", attention="native", out_dir=str(tmp_path),
               builders={"sdxl": broken, "flux": FLUX.build_tiny}, size=64, steps=1, reps=1)
    assert res["sdxl"] == {"error": "RuntimeError: no weights today"}
    assert res["flux"]["ours"]["e2e_s"] > 0
    assert len(list(tmp_path.glob("*.png"))) == 1


def _meta_pipe(name):
    """The full-size denoiser's config on the meta device (no memory), as bench.models builds it."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        if name == "flux":
            den = FluxTransformer2DModel(guidance_embeds=True)
        else:
            from bench.models import SDXL_UNET

            den = UNet2DConditionModel(**SDXL_UNET)
    stand_in = SimpleNamespace(config=den.config, device=torch.device("cpu"), dtype=torch.bfloat16)
    return SimpleNamespace(vae_scale_factor=8, **{"transformer" if name == "flux" else "unet": stand_in})


def test_full_size_denoiser_inputs_are_the_ones_the_gpu_runs_used():
    """Derived from the config, they equal the shapes once hard-coded for FLUX.1-dev and SDXL at 1024,
    drawn in the same order from the same seed (so the GPU's fidelity figure means the same)."""
    from app.families.flux import FAMILY as FLUX
    from app.families.sdxl import FAMILY as SDXL

    f = FLUX.denoiser_inputs(_meta_pipe("flux"), 1024, 1024)
    shapes = {k: tuple(v.shape) for k, v in f.items() if isinstance(v, torch.Tensor)}
    assert shapes == dict(hidden_states=(1, 4096, 64), encoder_hidden_states=(1, 512, 4096),
                          pooled_projections=(1, 768), timestep=(1,), guidance=(1,), img_ids=(4096, 3),
                          txt_ids=(512, 3))
    g = torch.Generator("cpu").manual_seed(0)
    first = torch.randn(1, 4096, 64, generator=g, dtype=torch.bfloat16)
    assert torch.equal(f["hidden_states"], first)
    assert torch.equal(f["encoder_hidden_states"], torch.randn(1, 512, 4096, generator=g, dtype=torch.bfloat16))

    s = SDXL.denoiser_inputs(_meta_pipe("sdxl"), 1024, 1024)
    assert tuple(s["sample"].shape) == (2, 4, 128, 128)
    assert tuple(s["encoder_hidden_states"].shape) == (2, 77, 2048)
    assert tuple(s["added_cond_kwargs"]["text_embeds"].shape) == (2, 1280)
    assert s["added_cond_kwargs"]["time_ids"].tolist() == [[1024, 1024, 0, 0, 1024, 1024]] * 2


def test_cli_help_and_tiny_run(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "OUT"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "bench", *a], cwd=ROOT, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    top = run("--help")
    assert top.returncode == 0 and "latency" in top.stdout and "coldstart" in top.stdout
    lat = run("latency", "--help")
    assert lat.returncode == 0 and all(o in lat.stdout for o in ("--out", "--tiny", "--size", "--steps"))
    out = tmp_path / "cli"
    done = run("latency", "--tiny", "--models", "flux", "--size", "64", "--steps", "1", "--compile", "off",
               "--attention", "native", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    (js,) = out.glob("latency_*.json")
    res = json.loads(js.read_text())
    assert res["flux"]["ours"]["e2e_s"] > 0 and "sdxl" not in res


def test_load_speed_readers_and_their_byte_check_on_cpu(tmp_path, monkeypatch):
    """bench.load_speed's readers (GPU-only in the bench) run on the CPU here: each returns every tensor,
    the byte check against safetensors passes, and it fails on a single altered byte."""
    import torch

    import weights.serialize as ser
    from bench import load_speed
    from weights.__main__ import bake

    monkeypatch.setattr(ser, "MAX_SHARD_BYTES", 40_000)  # several shards: first and last are checked
    bake("tiny-flux", tmp_path / "baked", "fp8", device="cpu")
    counts = {m: load_speed.child(m, str(tmp_path / "baked"), "cpu") for m in ("reader", "load", "safetensors")}
    assert counts["reader"]["tensors"] == counts["load"]["tensors"] == counts["safetensors"]["tensors"] > 0
    assert counts["reader"]["bytes_equal_safetensors"] and counts["load"]["bytes_equal_safetensors"]
    paths = load_speed._shards(tmp_path / "baked")
    assert len(paths) > 2
    _, got = load_speed._reader(tmp_path / "baked", paths, [], {}, "cpu")
    key = next(iter(got))
    got[key].reshape(-1).view(torch.uint8)[0] ^= 1
    assert not load_speed._same_bytes(got, paths)


def test_cli_exits_non_zero_when_a_model_failed(tmp_path, monkeypatch, capsys):
    """A model whose run raised is kept in the JSON with its error, and the command fails (exit 1).
    run_model is replaced by one that raises: the unit here is the CLI's verdict, not the run."""
    import bench.latency
    from bench.__main__ import main

    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(bench.latency, "run_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    assert main(["latency", "--tiny", "--models", "flux", "--out", str(tmp_path)]) == 1
    assert "failed for flux: RuntimeError: boom" in capsys.readouterr().err
    (js,) = tmp_path.glob("latency_*.json")
    assert json.loads(js.read_text())["flux"] == {"error": "RuntimeError: boom"}


def test_readme_cpu_bench_command_runs_flux_with_the_default_recipe(tmp_path):
    """`python -m bench latency --tiny` with the default compile (regional) and attention (fa3): on a CPU
    attention stays SDPA, and both models finish."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "OUT"}
    done = subprocess.run([sys.executable, "-m", "bench", "latency", "--tiny", "--size", "64", "--steps", "1",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    (js,) = tmp_path.glob("latency_*.json")
    res = json.loads(js.read_text())
    assert res["flux"]["ours"]["e2e_s"] > 0 and res["sdxl"]["ours"]["e2e_s"] > 0
    assert res["flux"]["recipe"]["attention"] == "native" and res["flux"]["recipe"]["compile"] == "regional"


def test_edit_bench_every_section_on_the_tiny_models(tmp_path, monkeypatch):
    """bench edit --tiny on the CPU: every section runs without error and writes its figures: Plus jobs
    through Service.run (one and two images, CFG at 1 and 3 steps), Kontext vs FLUX per step, the text
    encoders' FP8 error, the CFG-step variants (FP8 moves the output a little: not zero, not noise)."""
    from bench.__main__ import main as bench_main

    monkeypatch.delenv("OUT", raising=False)
    assert bench_main(["edit", "--tiny", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("edit_e2e_tiny_*.json")
    res = json.loads(js.read_text())
    assert res["versions"]["commit"] and res["versions"]["torch"]
    plus = res["plus_e2e"]["fa3"]
    for job in ("4step_1image", "4step_2images", "cfg_1step", "cfg_3step"):
        assert plus[job]["median_s"] > 0 and plus[job]["timings_ms"]["total_ms"] > 0, plus[job]
        assert plus[job]["size"] == "256x256"
    assert "cfg_step_s" in plus and plus["4step_1image_median_s"] > 0
    assert "skipped" in res["plus_e2e"]["fa3_fp8"]  # FA3 needs a GPU
    kv = res["kontext_vs_flux"]
    assert kv["tokens"]["kontext"] == kv["tokens"]["flux"] and kv["kontext_over_flux"] > 0
    for enc in ("qwen2_5_vl", "t5_xxl"):
        te = res["text_encoder_fp8"][enc]
        assert te["fp8_linears"] > 0 and 0 < te["rel_l2"] < 0.1 and te["weights"] == "random"
    cfg = res["cfg_step"]
    assert cfg["fp8_cpu"]["quantized_linears"] > 0 and 0 < cfg["fp8_cpu"]["rel_err_vs_stock"] < 0.1
    assert cfg["stock_eager"]["cfg_step_s"] > 0


def test_edit_bench_budget_skips_later_sections(tmp_path, monkeypatch):
    from bench import edit

    monkeypatch.delenv("OUT", raising=False)
    res = edit.main(out_dir=str(tmp_path), tiny=True, budget_s=0, sections=("kontext_vs_flux", "cfg_step"))
    assert res["kontext_vs_flux"] == {"skipped": "past the 0 s budget"} and "skipped" in res["cfg_step"]


def test_warmpath_bench_plumbing_on_the_tiny_flux(tmp_path):
    from bench.warmpath import CACHES, main

    res = main(tiny=True, size=64, steps=3, out_dir=str(tmp_path))
    assert res["text_cache"]["hit_ms"] < res["text_cache"]["miss_ms"]
    for name in CACHES:
        assert "error" not in res[name] and res[name]["rel_l2_vs_uncached"] >= 0
        assert res[name]["deterministic"] and res[name]["graphs_later"] == 0
    lengths = sorted(res["buckets"])
    assert res["buckets"][max(lengths)]["rel_l2_vs_longest"] == 0 and len(lengths) == 3
    assert res["buckets"][min(lengths)]["rel_l2_vs_longest"] > 0  # a shorter T5 sequence changes the latents
    assert list(tmp_path.glob("warmpath_*.json"))


def test_video_bench_plumbing_on_the_tiny_wan_model(tmp_path, monkeypatch):
    """bench video --tiny on the CPU: every section runs, FP8 moves the output a little, the e2e job
    goes through Service.run to an MP4, the JSON is written."""
    from bench.__main__ import main as bench_main

    monkeypatch.delenv("OUT", raising=False)
    assert bench_main(["video", "--tiny", "--steps", "1", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("video_tiny_*.json")
    res = json.loads(js.read_text())
    assert res["recipe"]["fp8_linears"] > 0 and 0 < res["ours_480p"]["rel_err_vs_stock_bf16"] < 0.1
    assert res["stock_eager_480p"]["cfg_step_s"] > 0 and res["ours_720p"]["cfg_step_s"] > 0
    assert res["vae_and_mp4_480p"]["mp4_vae_output_bytes"] > 0
    assert res["e2e_4step_480p"]["frames"] == 9 and res["e2e_4step_480p"]["mp4_bytes"] > 0
    vae = res["vae_and_mp4_480p"]
    assert vae["untiled"]["decode_s"] > 0 and vae["tiled"]["decode_s"] > 0
    order = [k for k in res if k in ("ours_480p", "e2e_4step_480p", "stock_eager_480p", "ours_720p")]
    assert order == ["ours_480p", "e2e_4step_480p", "ours_720p", "stock_eager_480p"]  # the goals' figures first
    assert set(res["goals"]) == {"cfg_step_480p_s<=4.0", "e2e_4step_480p_s<=14", "peak_480p_GiB<=40"}
    assert "ours_480p" in res["stock_eager_480p"]["ours_speedup"]


def test_lora_bench_plumbing_on_the_tiny_flux(tmp_path):
    """`bench lora --tiny` end to end: both workers, every job, the summary, the JSON under --out only."""
    from bench.lora import main

    before = _results_snapshot()
    assert main(["--tiny", "--out", str(tmp_path)]) == 0
    assert _results_snapshot() == before
    (path,) = tmp_path.glob("lora_tiny_*.json")
    res = json.loads(path.read_text())
    assert set(res["loras"]["jobs"]) == {"plain", "a_first", "a", "a2", "switch_b", "switch_a", "plain_after"}
    assert res["summary"]["graphs_compiled_by_lora_jobs"] == 0
    assert res["loras"]["branches"] > 0 and res["loras"]["jobs"]["a_first"]["loras_ms"] > 0
