"""Copied upstream code is guarded in CI: every diffusers function app.fused copies, and the private
registry app.attention writes into, must still have the source it was written against. A diffusers
upgrade that changes one fails here with the name of what to re-copy (and at run time the worker
falls back to the stock path rather than run a stale copy)."""

from __future__ import annotations

import inspect

import pytest

from app import attention, fused, upstream

COPIES = {**fused.COPIED, **attention.WRITES_INTO}


@pytest.mark.parametrize("name", sorted(COPIES))
def test_upstream_source_is_the_one_copied(name):
    assert upstream.fingerprint(name) == COPIES[name], (
        f"{name} changed upstream: re-copy it into app/{'fused' if name in fused.COPIED else 'attention'}.py "
        "and update its fingerprint")


def test_a_changed_copied_function_is_named(monkeypatch):
    """Change one copied function's source (as a diffusers upgrade would): only it is reported."""
    target = upstream.resolve(next(iter(fused.COPIED)))
    real = inspect.getsource

    def edited(obj):
        text = real(obj)
        return text + "    # upstream edit\n" if obj is target else text

    monkeypatch.setattr(inspect, "getsource", edited)
    assert upstream.changed(COPIES) == [next(iter(fused.COPIED))]


def test_a_vanished_name_counts_as_changed():
    assert upstream.changed({"diffusers.models.attention.NoSuchThing.forward": "0" * 16}) == [
        "diffusers.models.attention.NoSuchThing.forward"]


def test_fusion_and_fa3_fall_back_when_upstream_changed(monkeypatch):
    """With a stale copy the GELU fusion rebinds nothing and FA3 is not written into the registry."""
    from app.families.flux import FAMILY as FLUX
    from weights.quantize import quantize_denoiser

    den = FLUX.build_tiny().transformer
    quantize_denoiser(den, "fp8", FLUX.skips)
    monkeypatch.setattr(upstream, "changed", lambda copies: sorted(copies)[:1])
    assert fused.fuse_gelu_quant(den) == 0
    assert attention._install_fa3() is False
