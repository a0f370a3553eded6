"""Hostile input: at least 5,000 generated malformed jobs through Service.run, and every bound.

Each generated input is a valid job with exactly one thing wrong (or no object at all), so the
expected `field` is known: every one must come back as a clean invalid_input naming that field,
without a traceback or a path, and without the denoiser or an encoder running once.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import InvalidInput
from app.families import Family
from app.families.flux import FAMILY as FLUX
from app.limits import MAX_IMAGES, MAX_OUTPUT_BYTES, MAX_PROMPT_CHARS, MAX_STEPS, output_bytes_bound
from app.schema import MAX_SEED, Job, parse_job

EXAMPLES = 5000
VALID = {"prompt": "a red sneaker on a beach", "width": 256, "height": 256, "num_inference_steps": 1, "seed": 1}
FIELDS = set(Job.model_fields)

# Values that are wrong for any field of a given type.
not_int = st.one_of(st.floats(allow_nan=True), st.text(max_size=8), st.booleans(), st.lists(st.integers(), max_size=2),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
not_float = st.one_of(st.text(max_size=8), st.booleans(), st.lists(st.floats(), max_size=2), st.binary(max_size=4))
not_str = st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(st.text(max_size=3), max_size=2),
                    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
too_long = st.integers(MAX_PROMPT_CHARS + 1, 3 * MAX_PROMPT_CHARS).map(lambda n: ("lorem ipsum " * n)[:n])
bad_side = st.one_of(not_int, st.integers(max_value=FLUX.min_side - 1), st.integers(min_value=FLUX.max_side + 1),
                     st.integers(FLUX.min_side, FLUX.max_side).filter(lambda v: v % 16))
BAD = {
    "prompt": st.one_of(not_str, st.just(""), st.text(" \t\n\r", min_size=1, max_size=20), too_long),
    # FLUX is guidance-distilled: any negative prompt is refused, as is a wrong type
    "negative_prompt": st.one_of(not_str, st.text(min_size=1, max_size=50).filter(bool)),
    "width": bad_side,
    "height": bad_side,
    "num_inference_steps": st.one_of(not_int, st.integers(max_value=0), st.integers(min_value=MAX_STEPS + 1)),
    "guidance_scale": st.one_of(not_float, st.floats(max_value=-1e-9), st.floats(min_value=30.000001),
                                st.sampled_from([math.nan, math.inf, -math.inf])),
    "seed": st.one_of(not_int, st.integers(max_value=-1), st.integers(min_value=MAX_SEED + 1)),
    "num_images": st.one_of(not_int, st.integers(max_value=0), st.integers(min_value=MAX_IMAGES + 1)),
    "output_format": st.one_of(not_str, st.text(max_size=10).filter(lambda s: s not in ("png", "jpeg", "webp"))),
    "output_quality": st.one_of(not_int, st.integers(max_value=0), st.integers(min_value=101)),
    "cache": st.one_of(not_str, st.text(max_size=12).filter(lambda s: s not in ("off", "fbcache", "taylorseer",
                                                                                "magcache"))),
}


def _bad_field(draw_field: str):
    return BAD[draw_field].map(lambda v: ({**VALID, draw_field: v}, draw_field))


def _unknown_key():
    keys = st.text(min_size=1, max_size=80).filter(lambda k: k not in FIELDS)
    return st.tuples(keys, st.one_of(st.none(), st.integers(), st.text(max_size=5))).map(
        lambda kv: ({**VALID, kv[0]: kv[1]}, kv[0]))


def _missing_prompt():
    return st.sampled_from(sorted(FIELDS - {"prompt"})).map(
        lambda k: ({k: v for k, v in VALID.items() if k != "prompt"}, "prompt"))


not_an_object = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=20), st.booleans(),
                          st.lists(st.integers(), max_size=3)).map(lambda v: (v, "input"))
malformed = st.one_of(*[_bad_field(f) for f in sorted(BAD)], _unknown_key(), _missing_prompt(), not_an_object)


def safe(name: str) -> str:
    clean = "".join(c if c.isascii() and c.isprintable() else "?" for c in name[:64])
    return clean + ("..." if len(name) > 64 else "")


@pytest.fixture(scope="module")
def gpu_calls(tiny_flux_service):
    """Counts every forward of the denoiser and both text encoders: the 'GPU work' that must not happen."""
    pipe, calls = tiny_flux_service.pipe, []
    handles = [m.register_forward_pre_hook(lambda *a: calls.append(1))
               for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae)]
    yield calls
    for h in handles:
        h.remove()


def test_5000_malformed_inputs_are_refused_cleanly(tiny_flux_service, gpu_calls):
    seen = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(malformed)
    def check(case):
        raw, field = case
        out = tiny_flux_service.run(raw, f"bad-{len(seen)}")
        seen.append(field)
        assert set(out) == {"error"}, out
        err = out["error"]
        assert err["type"] == "invalid_input", err
        assert err["field"] == safe(field) if field not in FIELDS | {"input"} else err["field"] == field
        msg = err["message"]
        assert err["field"] in msg, msg
        assert len(msg) < 200 and "Traceback" not in msg and "File \"" not in msg and ".py" not in msg
        assert "/work" not in msg and "site-packages" not in msg and "\n" not in msg

    check()
    kinds = [f if f in FIELDS | {"input"} else "(unknown key)" for f in seen]
    print(f"\n{len(seen)} malformed inputs refused; by field: "
          + ", ".join(f"{f}={kinds.count(f)}" for f in sorted(set(kinds), key=lambda f: -kinds.count(f))))
    assert len(seen) >= EXAMPLES
    assert gpu_calls == [], "a malformed input reached the GPU"
    assert not tiny_flux_service.broken
    assert {f for f in seen if f in FIELDS} == set(BAD)  # every field was attacked


def test_every_bound_is_a_named_limit_enforced_at_validation():
    fam = FLUX.tiny_variant()
    ok = dict(VALID)
    cases = [
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
        ({"num_inference_steps": MAX_STEPS + 1}, "num_inference_steps"),
        ({"num_images": MAX_IMAGES + 1}, "num_images"),
        ({"width": fam.max_side + 16}, "width"),
    ]
    for change, field in cases:
        with pytest.raises(InvalidInput) as info:
            parse_job({**ok, **change}, fam)
        assert info.value.field == field
    parse_job({**ok, "prompt": "x" * MAX_PROMPT_CHARS, "num_inference_steps": MAX_STEPS, "num_images": MAX_IMAGES},
              fam)


def test_pixels_per_image_bound():
    fam = Family(name="wide", pipeline_class="X", denoiser="unet", defaults=FLUX.defaults, max_side=4096,
                 max_pixels=2048 * 2048, negative_prompt=True)
    with pytest.raises(InvalidInput, match="more than 4194304 pixels") as info:
        parse_job({"prompt": "a", "width": 4096, "height": 2048}, fam)
    assert info.value.field == "height"


def test_total_output_bytes_bound_refuses_before_gpu_work():
    """A family allowing 4 x 4096^2 would need ~200 MB of PNG: refused at validation, naming num_images."""
    fam = Family(name="huge", pipeline_class="X", denoiser="unet", defaults=FLUX.defaults, max_side=4096,
                 max_pixels=4096 * 4096, negative_prompt=True)
    job = {"prompt": "a", "width": 4096, "height": 4096}
    assert parse_job({**job, "num_images": 1}, fam).num_images == 1
    with pytest.raises(InvalidInput, match="output limit") as info:
        parse_job({**job, "num_images": 4}, fam)
    assert info.value.field == "num_images"
    # every job a real family accepts fits: the bound never refuses a valid FLUX/SDXL job
    assert output_bytes_bound(FLUX.max_side, FLUX.max_side, MAX_IMAGES) <= MAX_OUTPUT_BYTES


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_output_bytes_bound_holds_for_incompressible_images(fmt):
    import numpy as np
    from PIL import Image

    from app.outputs import encode_image

    for w, h in ((256, 256), (768, 1344)):
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert len(encode_image(noise, fmt, 100)) <= output_bytes_bound(w, h, 1)


def test_unknown_keys_are_echoed_safely(tiny_flux_service):
    out = tiny_flux_service.run({**VALID, "evil\nkey\x1b[31m" + "k" * 500: 1}, "bad-key")
    assert out["error"]["field"] == "evil?key?[31m" + "k" * 51 + "..."
