"""Model families: what differs between FLUX and SDXL, declared once as data.

A family names its diffusers pipeline and denoiser, its defaults and size limits, its shape
buckets (warmed before the first job), which denoiser layers must stay in bf16 when the rest is
quantized to FP8, and how a job maps onto the pipeline's call. The model's own config decides the
variant (FLUX.1-dev has guidance embeddings, FLUX.1-schnell has none): never the file name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable

from app.errors import WorkerBroken


@dataclass(frozen=True)
class Defaults:
    width: int
    height: int
    steps: int
    guidance: float
    max_sequence_length: int | None = None


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str  # a diffusers class name
    denoiser: str  # the pipeline attribute holding the transformer / UNet
    defaults: Defaults
    min_side: int = 256
    max_side: int = 2048
    max_pixels: int = 2048 * 2048
    shapes: tuple[tuple[int, int], ...] = ((1024, 1024),)
    # Denoiser modules (by qualified name) that stay bf16 under FP8/INT8: embedders, the final
    # projection and the norm/modulation layers. Quantizing them costs visible quality and buys
    # almost no time (they are <1% of the FLOPs).
    quant_skip: tuple[str, ...] = ()
    negative_prompt: bool = True  # does the pipeline take a negative prompt without extra passes
    # CUDA graphs around the denoiser when CUDA_GRAPHS is unset: on where a step is launch-bound
    # (SDXL's 70 compiled blocks per UNet call), off where the GPU is the bottleneck (FLUX).
    cuda_graphs: bool = False
    vram_gib: dict[str, float] = field(default_factory=dict)  # plan -> GiB needed at 1024x1024
    tiny: Callable[[], object] | None = None
    tiny_defaults: Defaults | None = None

    def skips(self, module_name: str) -> bool:
        """True when `module_name` of the denoiser must not be quantized."""
        return any(re.fullmatch(p, module_name) for p in self.quant_skip)

    def variant_defaults(self, pipe) -> Defaults:
        """Defaults for this pipeline: FLUX.1-schnell (no guidance embeddings) is a 4-step model."""
        if self.name == "flux" and not getattr(pipe.transformer.config, "guidance_embeds", True):
            return replace(self.defaults, steps=4, guidance=0.0, max_sequence_length=256)
        return self.defaults


def _tiny_flux():
    from app.tiny import build_tiny_flux

    return build_tiny_flux()


def _tiny_sdxl():
    from app.tiny import build_tiny_sdxl

    return build_tiny_sdxl()


FLUX = Family(
    name="flux",
    pipeline_class="FluxPipeline",
    denoiser="transformer",
    defaults=Defaults(1024, 1024, 28, 3.5, 512),
    min_side=256,
    max_side=2048,
    max_pixels=2048 * 2048,
    shapes=((1024, 1024), (1344, 768), (768, 1344)),
    quant_skip=(r"x_embedder", r"context_embedder", r"time_text_embed\..*", r"norm_out\..*", r"proj_out",
                r".*norm1(_context)?\.linear", r"single_transformer_blocks\.\d+\.norm\.linear"),
    negative_prompt=False,  # guidance-distilled: a negative prompt needs true CFG (2x cost)
    cuda_graphs=False,  # H200: 95.9 vs 96.2 ms/step (0.3%), not worth the graphs' memory (variants_graphs_h200.json)
    vram_gib={"bf16": 36.0, "fp8": 22.0, "int8": 22.0},
    tiny=_tiny_flux,
    tiny_defaults=Defaults(256, 256, 4, 3.5, 64),
)

SDXL = Family(
    name="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    denoiser="unet",
    defaults=Defaults(1024, 1024, 30, 5.0),
    min_side=256,
    max_side=2048,
    max_pixels=1536 * 1536,
    shapes=((1024, 1024), (1152, 896), (896, 1152)),
    quant_skip=(r"conv_in", r"conv_out", r"time_embedding\..*", r"add_embedding\..*", r".*norm.*",
                r".*time_emb_proj", r".*conv_shortcut", r".*proj_in", r".*proj_out"),
    negative_prompt=True,  # classifier-free guidance: both halves in one batched UNet forward
    cuda_graphs=True,  # H200 1024x1024: 46.7 -> 38.9 ms/step (latency_sdxl_nographs/_graphs_h200.json)
    vram_gib={"bf16": 12.0, "fp8": 10.0, "int8": 10.0},
    tiny=_tiny_sdxl,
    tiny_defaults=Defaults(256, 256, 4, 5.0),
)

FAMILIES = {f.name: f for f in (FLUX, SDXL)}
_BY_PIPELINE = {f.pipeline_class: f for f in FAMILIES.values()}


def family_for_pipeline_class(class_name: str) -> Family:
    """The family serving a diffusers pipeline class name (from model_index.json)."""
    try:
        return _BY_PIPELINE[class_name]
    except KeyError:
        known = ", ".join(sorted(_BY_PIPELINE))
        raise WorkerBroken(f"unsupported pipeline class {class_name!r} (supported: {known})", field="MODEL") from None


def family_for_tiny(model: str) -> Family | None:
    """`tiny-flux` -> FLUX, `tiny-sdxl` -> SDXL, anything else -> None."""
    if model.startswith("tiny-"):
        fam = FAMILIES.get(model.removeprefix("tiny-"))
        if fam is None:
            raise WorkerBroken(f"unknown embedded model {model!r} (use tiny-flux or tiny-sdxl)", field="MODEL")
        return fam
    return None
