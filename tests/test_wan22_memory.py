"""Memory plans with Wan 2.2 A14B's two experts: the plan decision counts both (a model_index.json or a
manifest holding transformer_2 is planned as A14B before any weight is read), and on the tiny Wan 2.2
pipeline offload-text puts both experts on the device and offload-blocks streams both, giving the
resident plan's frames.

What cannot run here: a GPU's free memory (a GpuFacts value, as tests/test_memory.py does) and group
offloading's CUDA stream. On the CPU diffusers' hooks run without a stream, host to host: the same
kernels see the same tensors, so the frames are byte-equal to the resident plan's (uint8 arrays
compared exactly; the MP4 is not compared, libx264 is not byte-reproducible run to run); the hooks'
onloads are counted per expert to prove each streamed path ran.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.config import Settings
from app.families import FAMILIES
from preflight.gpu import GIB, GpuFacts
from preflight.memory import HEADROOM_GIB, choose_memory_plan, need_gib, table_for

FAM = FAMILIES["wan-i2v"]
A14B = FAM.for_components({"transformer", "transformer_2"})
EXPERTS = ("transformer", "transformer_2")


def plan_for(family, free, precision="fp8"):
    return choose_memory_plan("auto", free, table_for(family.memory_table(), precision))


def test_the_a14b_table_counts_both_experts():
    one, both = table_for(FAM.memory_table(), "fp8"), table_for(A14B.memory_table(), "fp8")
    assert both["denoiser"] == 2 * 13.6 > one["denoiser"]
    assert need_gib(both, "resident") == round(2 * 13.6 + 10.6 + 0.24 + 4.4, 2)
    assert need_gib(both, "offload-text") == round(2 * 13.6 + 0.5 + 0.24 + 4.4, 2)  # both experts stay on
    assert need_gib(both, "offload-blocks") == round(0.95 + 0.24 + 4.4, 2)  # one block of one expert at a time
    assert need_gib(one, "resident") == 32.04  # the measured 32.03 GiB of a Wan 2.1 FP8 job (H200)


# free GiB -> (Wan 2.1 plan, Wan 2.2 plan) at FP8: 23.5 an RTX 4090, 40 an A100-40GB's free memory, 44.4 an L40S
@pytest.mark.parametrize("free, wan21, wan22", [(23.5, "offload-text", "offload-blocks"),
                                                (40.0, "resident", "offload-text"),
                                                (44.4, "resident", "resident"), (139.0, "resident", "resident")])
def test_the_plan_decision_counts_both_experts(free, wan21, wan22):
    got21, got22 = plan_for(FAM, free), plan_for(A14B, free)
    assert (got21.plan, got22.plan) == (wan21, wan22), (got21.describe(), got22.describe())
    assert got22.need_gib + HEADROOM_GIB <= free


def card(free_gib: float) -> GpuFacts:
    return GpuFacts("Test GPU", (8, 9), 1, ("sm_89",), int(free_gib * GIB), int(24 * GIB))


@pytest.mark.parametrize("transformer_2, plan", [(["diffusers", "WanTransformer3DModel"], "offload-blocks"),
                                                 ([None, None], "offload-text")])
def test_preflight_plans_a_folder_by_what_its_model_index_holds(tmp_path, transformer_2, plan):
    """Settings -> resolve -> preflight's memory check on a 24 GB card: a Wan 2.2 folder (transformer_2
    in model_index.json) is planned with both experts before any weight is read; Wan 2.1's is not."""
    from app.checks import preflight_inputs
    from app.source import resolve
    from preflight.resources import check_memory

    index = {"_class_name": "WanImageToVideoPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": transformer_2}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    settings = Settings(model=str(tmp_path))
    check, got = check_memory(preflight_inputs(settings, resolve(settings.model)), card(23.5), "fp8")
    assert check.status == "ok" and got.plan == plan, check.detail


def test_a_manifest_with_two_experts_is_planned_as_a14b():
    from app.source import _from_manifest

    manifest = {"family": "wan-i2v", "source": {"id": "Wan-AI/Wan2.2-I2V-A14B-Diffusers"},
                "denoiser": "transformer", "extra_denoisers": ["transformer_2"]}
    assert _from_manifest(manifest, "MODEL")[1].memory_table() == A14B.memory_table()
    manifest.pop("extra_denoisers")
    assert _from_manifest(manifest, "MODEL")[1].memory_table() == FAM.memory_table()


# --- the plans applied to the tiny Wan 2.2 pipeline through Service ----------------------------------

JOB = {"prompt": "a red sneaker turns", "num_frames": 5, "seed": 3}


def _run(tmp_path, plan: str):
    """(frames, service, onloads per expert) of one job under MEMORY_PLAN=plan."""
    import app.video
    from diffusers.hooks.group_offloading import ModuleGroup

    from app.service import Service
    from tests.test_wan22 import png_uri

    mp = pytest.MonkeyPatch()
    frames, groups = [], []
    encode, onload = app.video.encode_video, ModuleGroup.onload_
    mp.setattr(app.video, "encode_video", lambda f, job: frames.append(f) or encode(f, job))
    mp.setattr(ModuleGroup, "onload_", lambda self: (groups.append(self), onload(self))[1])
    try:
        svc = Service.load(Settings(model="tiny-wan-i2v-a14b", output_uri=str(tmp_path / plan), preflight=False,
                                    device="cpu", warmup=False, memory_plan=plan, cache_dir=str(tmp_path / "c")))
        result = svc.run({**JOB, "image": png_uri()}, f"job-{plan}")
    finally:
        mp.undo()
    assert "error" not in result, result
    owned = {n: {id(m) for m in getattr(svc.pipe, n).modules()} for n in EXPERTS}
    onloads = {n: sum(1 for g in groups if id(g.offload_leader) in ids) for n, ids in owned.items()}
    return frames[0], svc, onloads


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wan22-memory")
    return {plan: _run(tmp, plan) for plan in ("resident", "offload-text", "offload-blocks")}


@pytest.mark.parametrize("plan", ["offload-text", "offload-blocks"])
def test_each_plan_gives_the_resident_frames(runs, plan):
    frames, svc, onloads = runs[plan]
    assert svc.plan.memory == plan
    assert np.array_equal(frames, runs["resident"][0])
    assert runs["resident"][2] == {"transformer": 0, "transformer_2": 0}


def test_offload_blocks_streams_both_experts(runs):
    from diffusers.hooks.group_offloading import _get_group_onload_device

    _, svc, onloads = runs["offload-blocks"]
    assert onloads["transformer"] > 0 and onloads["transformer_2"] > 0, onloads
    for n in EXPERTS:
        assert str(_get_group_onload_device(getattr(svc.pipe, n))) == "cpu"


def test_offload_text_keeps_both_experts_whole_on_the_device(runs):
    from diffusers.hooks.group_offloading import _get_group_onload_device

    _, svc, onloads = runs["offload-text"]
    assert onloads == {"transformer": 0, "transformer_2": 0}
    for n in EXPERTS:
        with pytest.raises(ValueError):  # no group offloading hooks on it: moved whole
            _get_group_onload_device(getattr(svc.pipe, n))
    assert str(_get_group_onload_device(svc.pipe.text_encoder)) == "cpu"  # the encoder streams
