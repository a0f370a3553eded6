"""The memory plan: what stays on the GPU, chosen at start from free memory and the model's measured needs.

Plain values in (free GiB, a table of component -> GiB at the plan's precision), a `MemoryPlan` out.
The plans, fastest first (each with a whole decode, then a tiled one: tiling costs less than streaming):

  resident        every component on the GPU (the fastest path)
  offload-text    the text encoders live in host memory and stream through the GPU block by block
                  while they encode (group offloading with a CUDA stream): the cost is one host->device
                  copy of their weights per encode, the same kernels on the same inputs (same bytes)
  offload-blocks  the denoiser too streams by blocks (`enable_group_offload(..., "block_level",
                  use_stream=True)`): a step costs a host->device copy of the denoiser; last resort

`vae_tiling` is added to a plan whose peak is the VAE decode and that fits only with a tiled decode.
The peak of a plan is what stays resident plus the largest transient: the denoiser's working memory,
the decode's, or one streamed group (plus its prefetched neighbour). `MEMORY_PLAN` may force a plan;
one that cannot fit fails, naming what it needs and what is free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PLANS = ("resident", "offload-text", "offload-blocks")
REQUESTS = ("auto",) + PLANS
# Left free beyond the model's needs: cuBLAS/cuDNN workspaces, the caching allocator's fragmentation,
# compile autotuning buffers. A plan whose need lands within this of the free memory is not chosen.
HEADROOM_GIB = 1.0
# A streamed text encoder's footprint on the GPU: the group being used and the one prefetched
# (T5-XXL's largest leaf, its 32128x4096 embedding, is 0.25 GiB in bf16).
TEXT_STREAM_GIB = 0.5
# Tiled decoding (512 px tiles, diffusers' 25% overlap) against a whole 1024 px decode: about a
# quarter of the pixels per tile plus the overlap. An estimate until `python -m bench capped` measures it.
TILED_DECODE_FRACTION = 0.35
# GiB per component at one precision: weights of the denoiser, of all text encoders and of the VAE;
# `activations`: a denoiser step's working memory at the default size; `decode`: the VAE decode's at the
# default size; `block`: the denoiser's footprint while it streams (its largest block group, the
# prefetched next one, and the modules outside its block lists, which stay on while it runs).
COMPONENTS = ("denoiser", "text_encoders", "vae", "activations", "decode", "block")


class MemoryPlanError(ValueError):
    """A forced plan (or every plan) does not fit; `field` names the setting."""

    def __init__(self, message: str, field: str = "MEMORY_PLAN"):
        super().__init__(message)
        self.message, self.field = message, field


@dataclass(frozen=True)
class MemoryPlan:
    plan: str  # resident | offload-text | offload-blocks
    vae_tiling: bool
    need_gib: float  # the plan's expected peak, headroom not included
    free_gib: float | None  # None: not measured (CPU, or preflight off without a GPU)
    forced: bool = False
    alternatives: dict | None = None  # plan -> GiB it would need (what was weighed)

    @property
    def offloads_text(self) -> bool:
        return self.plan in ("offload-text", "offload-blocks")

    @property
    def offloads_denoiser(self) -> bool:
        return self.plan == "offload-blocks"

    def describe(self) -> str:
        tiling = " + VAE tiling" if self.vae_tiling else ""
        free = f" of {self.free_gib:.1f} GiB free" if self.free_gib is not None else ""
        how = "forced by MEMORY_PLAN" if self.forced else "auto"
        return f"{self.plan}{tiling} ({how}): about {self.need_gib:.1f} GiB needed{free}"

    def to_dict(self) -> dict:
        return asdict(self)


RESIDENT = MemoryPlan("resident", False, 0.0, None)


def default_table(vram_gib: float) -> dict[str, float]:
    """Components of a model known only by its total GiB: all of it resident, no separable parts,
    so only `resident` is distinguishable (the offload plans save nothing that is known)."""
    return {"denoiser": vram_gib, "text_encoders": 0.0, "vae": 0.0, "activations": 0.0, "decode": 0.0,
            "block": vram_gib}


def need_gib(table: dict[str, float], plan: str, vae_tiling: bool = False) -> float:
    """The expected peak GiB of `plan` for a component table (see the module docstring)."""
    t = {c: float(table.get(c, 0.0)) for c in COMPONENTS}
    decode = t["decode"] * (TILED_DECODE_FRACTION if vae_tiling else 1.0)
    if plan == "resident":
        resident, stream = t["denoiser"] + t["text_encoders"], 0.0
    elif plan == "offload-text":
        resident, stream = t["denoiser"], min(TEXT_STREAM_GIB, t["text_encoders"])
    elif plan == "offload-blocks":
        # the denoiser's streaming window; the encoders stream at another time than the blocks
        resident, stream = 0.0, max(t["block"], min(TEXT_STREAM_GIB, t["text_encoders"]))
    else:
        raise ValueError(f"unknown memory plan {plan!r}")
    return round(resident + t["vae"] + stream + max(t["activations"], decode), 2)


def _fits(need: float, free: float) -> bool:
    return need + HEADROOM_GIB <= free


def choose_memory_plan(requested: str, free_gib: float | None, table: dict[str, float] | None) -> MemoryPlan:
    """The plan for `MEMORY_PLAN=requested` with `free_gib` free on the GPU and the model's `table`
    (component -> GiB at the planned precision). `free_gib=None` (no GPU measured) or an unknown
    table: `auto` is resident and a forced plan is taken as asked. Raises MemoryPlanError when the
    forced plan, or for `auto` every plan, does not fit."""
    if requested not in REQUESTS:
        raise MemoryPlanError(f"MEMORY_PLAN={requested!r}: must be one of {', '.join(REQUESTS)}")
    forced = requested != "auto"
    if not table or free_gib is None:
        plan = requested if forced else "resident"
        return MemoryPlan(plan, False, need_gib(table or {}, plan), free_gib, forced)
    options = {p: need_gib(table, p) for p in PLANS}
    candidates = [requested] if forced else list(PLANS)
    for plan in candidates:
        for tiling in (False, True):
            if tiling and not table.get("decode"):
                continue
            need = need_gib(table, plan, tiling)
            if _fits(need, free_gib):
                return MemoryPlan(plan, tiling, need, round(free_gib, 2), forced, options)
    plan = candidates[-1]
    tiled = f" ({need_gib(table, plan, True):.1f} with VAE tiling)" if table.get("decode") else ""
    parts = ", ".join(f"{c} {table[c]:g}" for c in COMPONENTS if table.get(c))
    what = f"MEMORY_PLAN={requested}" if forced else "every memory plan (even offload-blocks)"
    raise MemoryPlanError(
        f"{what} needs about {need_gib(table, plan):.1f} GiB{tiled} + {HEADROOM_GIB:g} GiB headroom but "
        f"{free_gib:.1f} GiB is free "
        f"(GiB per component: {parts}): use a larger card, a lighter PRECISION"
        + (", or MEMORY_PLAN=auto" if forced else ", or free the GPU"))


def table_for(tables: dict | None, precision: str, text_encoders: str = "bf16") -> dict[str, float] | None:
    """The component table at `precision` (fp32 and unknown precisions read bf16's), with the text
    encoders' FP8 size when they run FP8 and the model has that figure."""
    tables = tables or {}
    table = tables.get(precision) or tables.get("bf16")
    if not table:
        return None
    table = dict(table)
    if text_encoders == "fp8" and "text_encoders_fp8" in table:
        table["text_encoders"] = table["text_encoders_fp8"]
    return table
