"""No compile inside a job: `warmup_plan` decides which warm-up passes run at which batch and size, and
after them one compiled graph per block class serves every batch 1-4 and every size the contract takes.

The compile is real (`compile_denoiser`, the recipe's own helper, with torch.compile's "eager" backend:
Dynamo traces, guards and recompiles exactly as on the GPU; only Inductor's code generation is left
out, which cannot run here for CUDA). The denoiser is a small diffusers ModelMixin with repeated
blocks shaped like FLUX's (batch x tokens x channels, tokens from the image size), so a test takes a
second instead of the real tiny pipeline's minute of tracing; the plan's sizes are the real families'.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from diffusers import ModelMixin
from torch import nn

from app.families.flux import FAMILY as FLUX
from app.families.sdxl import FAMILY as SDXL
from app.optimize import Recipe, compile_denoiser, first_run_cost, graphs_compiled, warmup, warmup_plan
from app.schema import parse_job


class Block(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.norm, self.qkv, self.out = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, temb):
        q, k, v = self.qkv(self.norm(x) * (1 + temb[:, None])).chunk(3, dim=-1)
        return x + self.out(nn.functional.scaled_dot_product_attention(q, k, v))


class ToyDenoiser(ModelMixin):
    _repeated_blocks = ["Block"]

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x, temb):
        for b in self.blocks:
            x = b(x, temb)
        return x


class ToyPipe:
    def __init__(self):
        torch.manual_seed(0)
        self.transformer = ToyDenoiser().eval()


@dataclass(frozen=True)
class ToyFamily(type(FLUX)):
    """FLUX's limits and buckets; a job is `steps` denoiser calls on (num_images, w*h/4096, 16)."""

    def generate(self, pipe, job, on_step=None, images=None):
        x = torch.randn(job.num_images, job.width * job.height // 4096, 16)  # 1/16 of FLUX's tokens: CPU-cheap
        temb = torch.randn(job.num_images, 16)
        with torch.inference_mode():
            for _ in range(job.num_inference_steps):
                x = pipe.transformer(x, temb)
        return list(x)


TOY = ToyFamily(**{f: getattr(FLUX, f) for f in FLUX.__dataclass_fields__})
COMPILED = Recipe(compile="regional", dynamic="auto")
# Jobs the contract accepts that no warm-up pass ran: every batch, bucket and off-bucket sizes, the limits.
JOBS = [(1024, 1024, 1), (1024, 1024, 3), (1344, 768, 4), (832, 1216, 1), (1216, 832, 2), (256, 256, 1),
        (2048, 2048, 4), (2048, 256, 3)]


def _job(family, w, h, n, steps=1):
    return parse_job(dict(prompt="p", width=w, height=h, num_images=n, num_inference_steps=steps), family)


def _plan(family, recipe, shapes=None):
    return [(w.job.width, w.job.height, w.job.num_images) for w in warmup_plan(family, family.warmup_jobs(shapes or family.shapes),
                                                                    recipe)]


# ---- the plan ---------------------------------------------------------------------------------------

def test_plan_flux_buckets_then_one_batch_two_pass():
    """FLUX's buckets already differ in pixel count (the token dimension goes dynamic on the second),
    so one more pass: batch 2 at a size no bucket has."""
    assert _plan(FLUX, COMPILED) == [(1024, 1024, 1), (1344, 768, 1), (768, 1344, 1), (1040, 1024, 2)]  # 1008x1024 has 1344x768's pixels


def test_plan_single_bucket_adds_a_batch_one_off_bucket_pass():
    assert _plan(FLUX, COMPILED, [(1024, 1024)]) == [(1024, 1024, 1), (1008, 1024, 1), (1040, 1024, 2)]
    assert _plan(SDXL, COMPILED, [(1024, 1024)]) == [(1024, 1024, 1), (1008, 1024, 1), (1040, 1024, 2)]


def test_plan_dynamic_all_needs_only_the_batch_pass():
    """dynamic=True compiles the token dimension dynamic at once; batch 1 is still specialized."""
    assert _plan(FLUX, Recipe(compile="regional", dynamic="all"), [(1024, 1024)]) == [(1024, 1024, 1),
                                                                                         (1008, 1024, 2)]


@pytest.mark.parametrize("recipe", [Recipe(), Recipe(compile="regional", dynamic="off"),
                                    Recipe(compile="off", dynamic="auto")])
def test_plan_without_dynamic_compile_is_the_buckets(recipe):
    assert _plan(FLUX, recipe) == [(1024, 1024, 1), (1344, 768, 1), (768, 1344, 1)]


def test_plan_sizes_stay_inside_the_family_limits():
    """At the smallest side the off-bucket size goes up, not under min_side; every job validates."""
    jobs = warmup_plan(FLUX, FLUX.warmup_jobs([(256, 256)]), COMPILED)
    assert [(w.job.width, w.job.height, w.job.num_images) for w in jobs] == [(256, 256, 1), (272, 256, 1), (288, 256, 2)]
    jobs = warmup_plan(FLUX, FLUX.warmup_jobs([(2048, 2048)]), COMPILED)
    assert [(w.job.width, w.job.height) for w in jobs] == [(2048, 2048), (2032, 2048), (2016, 2048)]
    assert all(w.job.num_inference_steps == 2 and w.job.seed == 0 for w in jobs)


def test_unknown_dynamic_mode_is_refused():
    with pytest.raises(ValueError, match="unknown dynamic mode 'some'"):
        compile_denoiser(ToyDenoiser(), "regional", "some", backend="eager")


# ---- the compile: warm-up, then no job compiles -------------------------------------------------------

def _warmed(recipe, shapes=None, plan=warmup_plan):
    torch._dynamo.reset()
    pipe = ToyPipe()
    pipe.transformer = compile_denoiser(pipe.transformer, recipe.compile, recipe.dynamic, backend="eager")
    warmup(pipe, TOY, plan(TOY, TOY.warmup_jobs(shapes or TOY.shapes), recipe))
    return pipe


def _compiles_per_job(pipe, jobs=JOBS):
    out = []
    for w, h, n in jobs:
        before = graphs_compiled()
        TOY.generate(pipe, _job(TOY, w, h, n))
        out.append(graphs_compiled() - before)
    return out


@pytest.mark.parametrize("dynamic, shapes", [("auto", None), ("auto", [(1024, 1024)]), ("all", [(1024, 1024)])])
def test_after_warmup_no_job_compiles(dynamic, shapes):
    recipe = Recipe(compile="regional", dynamic=dynamic)
    pipe = _warmed(recipe, shapes)
    assert graphs_compiled() > 0  # warm-up did compile (the counter counts what this test relies on)
    assert _compiles_per_job(pipe) == [0] * len(JOBS)
    warmed = _plan(TOY, recipe, shapes)
    assert [first_run_cost(recipe, warmed, *job) for job in JOBS] == ["none"] * len(JOBS)


def _buckets_only(family, jobs, recipe):
    return list(jobs)


@pytest.mark.parametrize("dynamic, shapes, plan", [("off", None, warmup_plan), ("auto", None, _buckets_only),
                                                   ("auto", [(1024, 1024)], _buckets_only),
                                                   ("all", [(1024, 1024)], _buckets_only)])
def test_the_rule_says_which_jobs_compile(dynamic, shapes, plan):
    """first_run_cost against Dynamo itself, where warm-up leaves graphs that do not serve every job
    (`off`, or the buckets alone)."""
    recipe = Recipe(compile="regional", dynamic=dynamic)
    pipe = _warmed(recipe, shapes, plan)
    warmed = [(w.job.width, w.job.height, w.job.num_images) for w in plan(TOY, TOY.warmup_jobs(shapes or TOY.shapes),
                                                                          recipe)]
    predicted = []
    for job in JOBS:  # each job's graphs exist for the next ones: the rule reads the history, as Service does
        predicted.append(first_run_cost(recipe, warmed, *job) == "compile")
        warmed.append(job)
    assert any(predicted) and not all(predicted)  # both kinds of job are in the comparison
    assert [n > 0 for n in _compiles_per_job(pipe)] == predicted


def test_the_rule_table():
    """The rule on FLUX's default buckets, without compiling: no size snaps, so every valid job is either
    served by a dynamic graph or compiles in its first run; CUDA graphs add a capture per new shape."""
    plan = _plan(FLUX, COMPILED)
    cost = lambda recipe, w, h, n: first_run_cost(recipe, plan if recipe.dynamic != "off" else  # noqa: E731
                                                  _plan(FLUX, recipe), w, h, n)
    assert {cost(COMPILED, w, h, n) for w, h, n in JOBS} == {"none"}
    off = Recipe(compile="regional", dynamic="off")
    assert [cost(off, *j) for j in [(1024, 1024, 1), (1344, 768, 1), (1024, 1024, 2), (832, 1216, 1)]] == [
        "none", "none", "compile", "compile"]
    graphs = Recipe(compile="regional", dynamic="auto", cuda_graphs=True)
    assert [cost(graphs, *j) for j in [(1024, 1024, 1), (1040, 1024, 2), (1024, 1024, 2)]] == [
        "none", "none", "capture"]
    assert first_run_cost(Recipe(), [], 832, 1216, 3) == "none"  # nothing compiled: nothing to pay
    assert first_run_cost(COMPILED, [], 1024, 1024, 1) == "compile"  # WARMUP=0: the first job compiles
    # batch 1 generalizes from batch-1 passes only: one bucket plus a batch-2 pass leaves batch-1 static
    assert first_run_cost(COMPILED, [(1024, 1024, 1), (1040, 1024, 2)], 1008, 1024, 1) == "compile"
    assert first_run_cost(COMPILED, [(1024, 1024, 1), (1040, 1024, 2)], 1008, 1024, 3) == "none"
    # a full compile may see the latents' sides: both must have varied
    full = Recipe(compile="full", dynamic="auto")
    assert first_run_cost(full, [(1024, 1024, 1), (1008, 1024, 1)], 1024, 1008, 1) == "compile"
    assert first_run_cost(full, [(1024, 1024, 1), (1344, 768, 1)], 1024, 1008, 1) == "none"


def test_static_graphs_compile_inside_the_job():
    """dynamic=off: the measured problem: a batch or a size no bucket had compiles in the job."""
    pipe = _warmed(Recipe(compile="regional", dynamic="off"))
    compiled = _compiles_per_job(pipe, [(1024, 1024, 1), (1024, 1024, 2), (832, 1216, 1), (832, 1216, 1)])
    assert [n > 0 for n in compiled] == [False, True, True, False]


def test_full_compile_is_generalized_too():
    recipe = Recipe(compile="full", dynamic="auto")
    torch._dynamo.reset()
    pipe = ToyPipe()
    pipe.transformer._repeated_blocks = []  # instance attribute: compile the whole module
    pipe.transformer = compile_denoiser(pipe.transformer, "regional", "auto", backend="eager")
    warmup(pipe, TOY, warmup_plan(TOY, TOY.warmup_jobs(TOY.shapes), recipe))
    assert _compiles_per_job(pipe) == [0] * len(JOBS)


def test_dynamic_comes_from_settings_on_a_gpu_plan():
    from app.config import Settings
    from app.optimize import choose_recipe
    from preflight.plan import Plan

    plan = Plan("cuda", "fp8", (9, 0), "NVIDIA H200")
    assert choose_recipe(plan, Settings()).dynamic == "auto"
    assert choose_recipe(plan, Settings(dynamic="off")).dynamic == "off"
