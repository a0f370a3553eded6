"""Helpers shared by the hardening tests: services around the session's tiny pipeline."""

from __future__ import annotations

import pytest

from app.service import Service


def service_like(base: Service, store=None, **settings) -> Service:
    """A fresh Service (own `broken` flag, own store, own settings) around `base`'s loaded pipeline.

    Loading the tiny pipeline costs seconds; a second Service around the same weights costs nothing
    and keeps a test that breaks its worker from breaking the session's.
    """
    return Service(base.pipe, base.source, base.settings.model_copy(update=settings), base.plan,
                   store if store is not None else base.store, {})


@pytest.fixture
def one_torch_thread():
    """Run the tiny model on one thread: on a 2-core machine shared with other test runs, torch's
    two threads fight each other and everything else (measured: VAE decode 60 ms vs 350-700 ms)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_job(seed: int, **extra) -> dict:
    """The cheapest real job: 256x256 (the family minimum), one denoising step."""
    return {"prompt": "a red cat on a beach", "seed": seed, "width": 256, "height": 256, "num_inference_steps": 1, **extra}
