"""app.cudagraphs on the CPU: the wrapper is transparent (attributes, outputs, pipelines).

Capturing and replaying a CUDA graph needs a GPU; `python -m bench variants regional_graphs`
exercises that path on the H200 and checks replayed latents against plain runs.
"""

from __future__ import annotations

import torch

from app.cudagraphs import GraphedDenoiser, _signature
from app.families.flux import FAMILY as FLUX
from app.optimize import Recipe, apply_recipe


def test_wrapper_forwards_attributes_and_passes_cpu_calls_through():
    pipe = FLUX.build_tiny()
    den = pipe.transformer
    wrapped = GraphedDenoiser(den)
    assert wrapped.config is den.config and wrapped.dtype == den.dtype
    assert wrapped.module is den
    x = torch.randn(1, 16, den.config.in_channels)
    kw = dict(hidden_states=x, encoder_hidden_states=torch.randn(1, 8, den.config.joint_attention_dim),
              pooled_projections=torch.randn(1, den.config.pooled_projection_dim), timestep=torch.tensor([0.5]),
              img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
    if den.config.guidance_embeds:
        kw["guidance"] = torch.tensor([3.5])
    with torch.no_grad():
        assert torch.equal(wrapped(**kw)[0], den(**kw)[0])
    assert not wrapped._graphs  # nothing on CUDA: nothing captured


def test_signature_separates_shapes_dtypes_and_values():
    a, b = torch.zeros(2, 3), torch.zeros(2, 4)
    assert _signature([a, None, False]) == _signature([torch.ones(2, 3), None, False])
    assert _signature([a]) != _signature([b])
    assert _signature([a]) != _signature([a.to(torch.bfloat16)])
    assert _signature([a, False]) != _signature([a, True])


def test_recipe_wraps_the_denoiser_and_the_pipeline_still_generates():
    pipe = FLUX.build_tiny()
    applied = apply_recipe(pipe, FLUX, Recipe(cuda_graphs=True))
    assert "cuda_graphs" in applied and isinstance(pipe.transformer, GraphedDenoiser)
    image = pipe(prompt="a cat", width=64, height=64, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
