"""The memory plan: preflight's decision for a table of cards, a forced plan that cannot fit, and the
plans applied to the tiny FLUX pipeline through the worker's real Service path on the CPU.

What cannot run here: a GPU's free memory (a GpuFacts value, the seam test_preflight uses) and the CUDA
stream of group offloading. On the CPU diffusers' group offloading runs its hooks without a stream, host
to host (onload and offload move nothing): the tests count the hooks' onloads to prove the streamed
path ran, and compare the output bytes with the resident plan's.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from app.config import Settings
from app.errors import WorkerBroken
from app.families import FAMILIES
from app.families.flux import FAMILY as FLUX
from app.families.sdxl import FAMILY as SDXL
from app.storage import LocalStore
from preflight.gpu import GIB, GpuFacts
from preflight.memory import HEADROOM_GIB, MemoryPlanError, choose_memory_plan, need_gib, table_for
from preflight.resources import check_memory


QWEN = FAMILIES["qwen-image-edit-plus"]


def card(free_gib: float, total_gib: float = 24.0) -> GpuFacts:
    return GpuFacts("Test GPU", (8, 9), 1, ("sm_89",), int(free_gib * GIB), int(total_gib * GIB))


def plan_for(family, precision, free, text="bf16", requested="auto"):
    return choose_memory_plan(requested, free, table_for(family.memory_table(), precision, text))


# free GiB, family, precision, text encoders -> plan, VAE tiling. 23.5: an RTX 4090's free memory;
# 139: an H200's; 44.4: an L40S's; 17.5/15.5: between FLUX FP8's offload-text needs with and without tiling.
CASES = [
    (139.0, FLUX, "fp8", "bf16", "resident", False),
    (139.0, FLUX, "bf16", "bf16", "resident", False),
    (44.4, FLUX, "fp8", "bf16", "resident", False),
    (23.5, FLUX, "fp8", "bf16", "offload-text", False),  # resident needs 25.8 (measured 25.85 on H200)
    (23.5, FLUX, "fp8", "fp8", "resident", False),  # FP8 T5: 22.45 + 1 headroom fits
    (23.5, FLUX, "int8", "bf16", "offload-text", False),
    (23.5, FLUX, "bf16", "bf16", "offload-blocks", False),  # the bf16 denoiser alone is 22.2 GiB
    (17.5, FLUX, "fp8", "bf16", "offload-text", True),
    (15.5, FLUX, "fp8", "bf16", "offload-blocks", False),
    (23.5, SDXL, "fp8", "bf16", "resident", False),
    (7.0, SDXL, "fp8", "bf16", "resident", True),  # a tiled decode is preferred to streaming
    (6.0, SDXL, "fp8", "bf16", "offload-text", True),
    (5.3, SDXL, "fp8", "bf16", "offload-blocks", True),
    (139.0, FLUX, "fp32", "bf16", "resident", False),  # fp32 reads bf16's table
    # Qwen-Image-Edit(-Plus): its FP8 transformer alone (25.4) is over a 24 GB card
    (23.5, QWEN, "fp8", "bf16", "offload-blocks", False),
    (23.5, QWEN, "fp8", "fp8", "offload-blocks", False),
    (30.9, QWEN, "fp8", "bf16", "offload-text", False),  # an RTX 5090
    (44.4, QWEN, "fp8", "bf16", "resident", True),  # an L40S: a whole decode would need 44.1 + 1 headroom
    (78.6, QWEN, "fp8", "bf16", "resident", False),  # an H100
    (78.6, QWEN, "int8", "bf16", "resident", False),
]


@pytest.mark.parametrize("free,family,precision,text,plan,tiling", CASES)
def test_the_plan_for_a_card_family_and_precision(free, family, precision, text, plan, tiling):
    got = plan_for(family, precision, free, text)
    assert (got.plan, got.vae_tiling) == (plan, tiling), got.describe()
    assert got.need_gib + HEADROOM_GIB <= free and got.free_gib == free and not got.forced
    assert set(got.alternatives) == {"resident", "offload-text", "offload-blocks"}


def test_needs_add_up_from_the_components():
    t = table_for(FLUX.memory_table(), "fp8")
    assert need_gib(t, "resident") == round(14.16 + 9.10 + 0.16 + 2.4, 2)  # 25.82 against 25.85 measured
    assert need_gib(t, "offload-text") == round(14.16 + 0.5 + 0.16 + 2.4, 2)
    assert need_gib(t, "offload-blocks", vae_tiling=True) == round(0.96 + 0.16 + 1.0, 2)  # tiled decode < step
    assert table_for(FLUX.memory_table(), "fp8", "fp8")["text_encoders"] == 5.73
    assert table_for({}, "fp8") is None


def test_nothing_fits_names_what_is_needed_and_what_is_free():
    with pytest.raises(MemoryPlanError) as e:
        plan_for(FLUX, "fp8", 3.0)
    assert "every memory plan" in e.value.message and "3.0 GiB is free" in e.value.message
    assert "denoiser 14.16" in e.value.message and e.value.field == "MEMORY_PLAN"


def test_a_forced_plan_is_kept_when_it_fits_and_refused_when_it_does_not():
    got = plan_for(FLUX, "fp8", 139.0, requested="offload-blocks")
    assert got.plan == "offload-blocks" and got.forced and "forced by MEMORY_PLAN" in got.describe()
    with pytest.raises(MemoryPlanError) as e:
        plan_for(FLUX, "fp8", 23.5, requested="resident")
    assert "MEMORY_PLAN=resident needs about" in e.value.message and "23.5 GiB is free" in e.value.message
    with pytest.raises(MemoryPlanError):
        choose_memory_plan("offload", 10.0, None)


def test_without_a_measured_gpu_auto_is_resident_and_a_forced_plan_is_taken_as_asked():
    assert choose_memory_plan("auto", None, None).plan == "resident"
    assert choose_memory_plan("offload-text", None, None).plan == "offload-text"
    # a family known only by vram_gib: its total is one resident block, the offload plans save nothing
    assert plan_for(FLUX.tiny_variant(), "bf16", 1.6).plan == "resident"


def test_a_forced_plan_that_cannot_fit_fails_at_start_through_settings_and_preflight(tmp_path):
    """Settings -> the worker's preflight Inputs -> the vram check on a 24 GB card (the GPU seam)."""
    from app.checks import preflight_inputs
    from app.source import resolve

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    settings = Settings.from_env({"MODEL": str(tmp_path), "MEMORY_PLAN": "resident"})
    inputs = preflight_inputs(settings, resolve(settings.model))
    check, plan = check_memory(inputs, card(23.5), "fp8")
    assert check.status == "fail" and plan is None
    assert "MEMORY_PLAN=resident needs about 25.8 GiB" in check.detail and "23.5 GiB is free" in check.detail
    auto = preflight_inputs(Settings(model=str(tmp_path)), resolve(str(tmp_path)))
    check, plan = check_memory(auto, card(23.5), "fp8")
    assert check.status == "ok" and plan.plan == "offload-text"
    assert "memory plan offload-text (auto)" in check.detail and "resident 25.82" in check.detail


def test_preflight_off_refuses_a_forced_plan_by_name_too():
    """PREFLIGHT=0 on a CPU: the forced plan is taken (nothing to weigh); an invalid one never gets here
    (Settings refuses it, see test_config)."""
    from app.checks import run_preflight
    from app.source import resolve

    settings = Settings(preflight=False, memory_plan="offload-text")
    assert run_preflight(settings, resolve(settings.model)).memory == "offload-text"


# --- the plans applied to the tiny FLUX pipeline ------------------------------------------------------

def _onload_counter(monkeypatch) -> list:
    """Count group offloading's onloads (a spy: the real method runs)."""
    from diffusers.hooks.group_offloading import ModuleGroup

    calls, real = [], ModuleGroup.onload_
    monkeypatch.setattr(ModuleGroup, "onload_", lambda self: (calls.append(id(self)), real(self))[1])
    return calls


def _job(tmp_path, monkeypatch, **settings):
    from app.service import Service

    calls = _onload_counter(monkeypatch)
    out = tmp_path / "-".join(f"{v}" for v in settings.values())
    service = Service.load(Settings(output_uri=str(out), warmup=False, **settings), LocalStore(str(out)))
    result = service.run({"prompt": "a red fox", "seed": 3, "num_inference_steps": 1}, "job-1")
    assert "images" in result, result
    data = (out / result["images"][0]["key"]).read_bytes()
    return hashlib.sha256(data).hexdigest(), service, result, len(calls)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("memory")
    try:
        return {(plan, text): _job(tmp, mp, memory_plan=plan, text_encoders=text)
                for plan, text in (("resident", "bf16"), ("offload-text", "bf16"), ("offload-blocks", "bf16"),
                                   ("offload-text", "fp8"))}
    finally:
        mp.undo()


@pytest.mark.parametrize("plan", ["offload-text", "offload-blocks"])
def test_offloaded_plans_give_the_resident_bytes(runs, plan):
    digest, service, result, onloads = runs[(plan, "bf16")]
    assert digest == runs[("resident", "bf16")][0]
    assert result["cold_start"]["memory_plan"] == plan and service.plan.memory == plan
    assert onloads > 0 and runs[("resident", "bf16")][3] == 0  # the streamed path really ran
    from diffusers.hooks.group_offloading import _get_group_onload_device

    for name in ("text_encoder", "text_encoder_2"):
        assert str(_get_group_onload_device(getattr(service.pipe, name))) == "cpu"
    streams_denoiser = plan == "offload-blocks"
    try:
        _get_group_onload_device(service.pipe.transformer)
        assert streams_denoiser
    except ValueError:  # no group offloading hooks on it
        assert not streams_denoiser


def test_fp8_text_encoders_through_the_worker_change_the_image(runs):
    fp8, service, result, _ = runs[("offload-text", "fp8")]
    assert fp8 != runs[("resident", "bf16")][0] and service.plan.text_encoders == "fp8"
    from weights.fp8 import FP8Linear

    swapped = [n for n, m in service.pipe.text_encoder_2.named_modules() if isinstance(m, FP8Linear)]
    assert swapped and not any(n.endswith(".wo") for n in swapped)


def test_streamed_fp8_text_encoders_give_the_resident_embeddings():
    from app.memory import place
    from preflight import Plan

    def embeds(plan):
        pipe = FLUX.build_tiny()
        place(pipe, FLUX, plan)
        with torch.inference_mode():
            return pipe.encode_prompt("a red fox", None, max_sequence_length=64)[:2]

    resident = embeds(Plan("cpu", "fp32", text_encoders="fp8"))
    streamed = embeds(Plan("cpu", "fp32", memory="offload-text", text_encoders="fp8"))
    assert all(torch.equal(a, b) for a, b in zip(resident, streamed))


def test_offload_blocks_turns_compile_and_graphs_off_and_tiling_sets_512_px_tiles():
    from app.memory import adjust_recipe, place
    from app.optimize import Recipe
    from preflight import Plan

    recipe = Recipe(compile="regional", cuda_graphs=True, quantize="fp8")
    assert adjust_recipe(recipe, Plan("cuda", "fp8", memory="offload-blocks")) == Recipe(quantize="fp8")
    assert adjust_recipe(recipe, Plan("cuda", "fp8", memory="offload-text")) is recipe
    pipe = FLUX.build_tiny()
    done = place(pipe, FLUX, Plan("cpu", "fp32", vae_tiling=True))
    assert done["vae_tiling"] == 512 and pipe.vae.use_tiling and pipe.vae.tile_latent_min_size == 512 // 8


def test_text_encoder_fp8_keeps_embeddings_norms_and_t5_wo_and_stays_close():
    from weights.quantize import quantize_text_encoder

    pipe = FLUX.build_tiny()
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    t5 = pipe.text_encoder_2
    with torch.inference_mode():
        ref = t5(ids)[0]
    names = quantize_text_encoder(t5)
    assert names and all(n.startswith("encoder.block.") and not n.endswith(".wo") for n in names)
    assert quantize_text_encoder(t5) == []  # idempotent
    with torch.inference_mode():
        got = t5(ids)[0]
    err = ((got - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 0.1
    clip = pipe.text_encoder
    quantize_text_encoder(clip)
    kept = dict(clip.named_modules())
    assert isinstance(kept["embeddings.token_embedding"], torch.nn.Embedding)
    assert isinstance(kept["final_layer_norm"], torch.nn.LayerNorm)


def test_a_bad_memory_setting_breaks_the_worker_by_name():
    with pytest.raises(WorkerBroken) as e:
        Settings.from_env({"MEMORY_PLAN": "all-offload"})
    assert e.value.field == "MEMORY_PLAN"
