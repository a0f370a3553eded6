"""The tiny FLUX transformer's fixed inputs and a relative error, shared by the LoRA tests."""

from __future__ import annotations

import torch


def inputs(seed: int) -> dict:
    """One denoiser call's inputs for the tiny FLUX (64 latent tokens, 8 text tokens), drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 64, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.7]),
                img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))


def forward(transformer, seed: int) -> torch.Tensor:
    """The transformer's output on `inputs(seed)`, without autograd."""
    with torch.no_grad():
        return transformer(**inputs(seed)).sample


def rel(a, b) -> float:
    """|a - b| / |b|: how far `a` is from the reference `b`."""
    return ((a - b).norm() / b.norm()).item()
