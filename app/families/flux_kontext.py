"""FLUX.1 Kontext (dev) image editing: `FluxKontextPipeline` over FLUX's `FluxTransformer2DModel`.

The FLUX recipe (skip list, tiny build, encoders) with the reference image's latent tokens appended
to the image tokens: a step attends over twice the tokens of a text-to-image step at the same size.
The reference is fitted to the family's size rule by its own aspect ratio (with an output size from
the input, exactly the output's size), and passed with `_auto_resize=False`: the pipeline's own
resize would pick one of 17 trained resolutions, so each job's token count, and the compiled
shapes, would depend on the input's aspect ratio. Warm-up buckets therefore cover the reference too.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from app.families.base import Defaults, StepCallback
from app.families.flux import FAMILY as FLUX
from app.families.flux import Flux
from app.schema import Job


@dataclass(frozen=True)
class FluxKontext(Flux):
    def variant(self, denoiser_config):
        return self  # Kontext dev has guidance embeddings; there is no schnell-like variant

    def call_kwargs(self, job: Job, on_step: StepCallback | None = None, images: list | None = None) -> dict:
        kw = super().call_kwargs(job, on_step, images)
        ref = images[0]
        kw["image"] = [self.fit_input(ref, *self.fit_size(*ref.size))] * job.num_images
        # the pipeline resizes the OUTPUT to max_area at the job's aspect ratio: this area keeps the job's size
        kw["max_area"] = job.width * job.height
        kw["_auto_resize"] = False
        return kw

    def denoiser_inputs(self, pipe, width: int, height: int, seed: int = 0) -> dict:
        """FLUX's inputs with a same-size reference image's tokens appended (ids' first axis 1)."""
        import torch

        out = super().denoiser_inputs(pipe, width, height, seed)
        ref_ids = out["img_ids"].clone()
        ref_ids[..., 0] = 1
        out["hidden_states"] = torch.cat([out["hidden_states"], torch.randn_like(out["hidden_states"])], dim=1)
        out["img_ids"] = torch.cat([out["img_ids"], ref_ids], dim=0)
        return out


FAMILY = FluxKontext(
    **{**{f.name: getattr(FLUX, f.name) for f in fields(FLUX)},
       "name": "flux-kontext",
       "pipeline_class": "FluxKontextPipeline",
       "defaults": Defaults(1024, 1024, 28, 2.5, FLUX.defaults.max_sequence_length),
       # Kontext dev is trained at about one megapixel (1568x672 to 672x1568): larger outputs and
       # references leave its distribution and double a FLUX step's tokens
       "max_pixels": 1568 * 672,
       "max_side": 1568,
       "shapes": ((1024, 1024), (1248, 832), (832, 1248)),
       # FLUX's figures (the same weights); the reference tokens' extra activations are not measured yet
       "vram_gib": FLUX.vram_gib,
       "tiny_defaults": Defaults(256, 256, 4, 2.5, 64),
       "checkpoint_keys": FLUX.checkpoint_keys,  # BFL's single-file key names, as FLUX.1-dev's
       "max_images": 1,
       "requires_image": True,
       "img2img_class": None,
       "default_strength": FLUX.default_strength,
       "mag_ratios": None},  # FLUX.1-dev's MagCache calibration is not Kontext's
)
