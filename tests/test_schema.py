"""The job contract: defaults, bounds and unknown fields, each error naming its field."""

import pytest

from app.errors import InvalidInput
from app.families.flux import FAMILY as FLUX
from app.families.sdxl import FAMILY as SDXL
from app.schema import MAX_SEED, JobError, JobResult, parse_job


def parse(raw, family=SDXL):
    return parse_job(raw, family)


def refused(raw, family=SDXL) -> InvalidInput:
    with pytest.raises(InvalidInput) as e:
        parse(raw, family)
    assert e.value.type == "invalid_input"
    assert e.value.field in e.value.message, e.value.message  # the message names the field too
    return e.value


def test_defaults_come_from_the_family():
    for fam in (FLUX, SDXL):
        job = parse({"prompt": "a cat", "seed": 1}, fam)
        d = fam.defaults
        assert (job.width, job.height, job.num_inference_steps, job.guidance_scale) == (
            d.width, d.height, d.steps, d.guidance)
        assert (job.num_images, job.output_format, job.output_quality, job.negative_prompt) == (1, "png", 90, None)
        assert fam.call_kwargs(job).get("max_sequence_length") == d.max_sequence_length


def test_given_values_are_kept():
    raw = {"prompt": "a cat", "negative_prompt": "blur", "width": 512, "height": 768, "num_inference_steps": 7,
           "guidance_scale": 0, "seed": 0, "num_images": 4, "output_format": "webp", "output_quality": 1}
    job = parse(raw)
    assert job.model_dump(exclude={"max_sequence_length"}, exclude_none=True) == raw
    assert job.seeds == [0, 1, 2, 3]


def test_seed_is_drawn_when_absent():
    seeds = {parse({"prompt": "a cat"}).seed for _ in range(5)}
    assert all(0 <= s <= MAX_SEED for s in seeds)
    assert len(seeds) > 1  # five equal draws out of 2**32 would be a broken generator


def test_seeds_wrap_at_the_top():
    assert parse({"prompt": "a", "seed": MAX_SEED, "num_images": 2}).seeds == [MAX_SEED, 0]


@pytest.mark.parametrize("raw, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a", "negative_prompt": "x" * 2001}, "negative_prompt"),
    ({"prompt": "a", "width": 100000}, "width"),
    ({"prompt": "a", "width": 1000}, "width"),  # not a multiple of 16
    ({"prompt": "a", "width": 240}, "width"),
    ({"prompt": "a", "width": "512"}, "width"),
    ({"prompt": "a", "height": 2064}, "height"),
    ({"prompt": "a", "height": 520}, "height"),
    ({"prompt": "a", "width": 2048, "height": 2048}, "height"),  # more pixels than SDXL allows
    ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "a", "num_inference_steps": 101}, "num_inference_steps"),
    ({"prompt": "a", "guidance_scale": -0.1}, "guidance_scale"),
    ({"prompt": "a", "guidance_scale": 30.5}, "guidance_scale"),
    ({"prompt": "a", "guidance_scale": float("nan")}, "guidance_scale"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "seed": MAX_SEED + 1}, "seed"),
    ({"prompt": "a", "seed": True}, "seed"),
    ({"prompt": "a", "num_images": 0}, "num_images"),
    ({"prompt": "a", "num_images": 5}, "num_images"),
    ({"prompt": "a", "output_format": "gif"}, "output_format"),
    ({"prompt": "a", "output_quality": 0}, "output_quality"),
    ({"prompt": "a", "output_quality": 101}, "output_quality"),
    ({"prompt": "a", "steps": 4}, "steps"),  # unknown field
])
def test_bad_inputs_name_their_field(raw, field):
    assert refused(raw).field == field


def test_bounds_are_inclusive():
    job = parse({"prompt": "x" * 2000, "width": 256, "height": 1536, "num_inference_steps": 100,
                 "guidance_scale": 30, "seed": MAX_SEED, "num_images": 4, "output_quality": 100})
    assert (job.width, job.height, job.num_inference_steps) == (256, 1536, 100)
    assert parse({"prompt": "a", "width": 2048, "height": 2048}, FLUX).width == 2048


def test_unknown_field_is_named_and_said_unknown():
    e = refused({"prompt": "a", "image_url": "http://x"})
    assert e.field == "image_url" and "unknown" in e.message


def test_flux_refuses_a_negative_prompt_sdxl_takes_it():
    assert refused({"prompt": "a", "negative_prompt": "blur"}, FLUX).field == "negative_prompt"
    assert parse({"prompt": "a", "negative_prompt": "blur"}, SDXL).negative_prompt == "blur"


@pytest.mark.parametrize("raw", [None, "a cat", ["a cat"], 3])
def test_input_must_be_an_object(raw):
    assert refused(raw).field == "input"


def test_error_message_does_not_echo_the_input():
    e = refused({"prompt": "a", "output_format": "secret-ish-value"})
    assert "secret-ish-value" not in e.message


def test_result_and_error_models_accept_the_documented_shapes():
    result = {"images": [{"url": "file:///o/j/0.png", "key": "j/0.png", "width": 256, "height": 256, "seed": 7,
                          "content_type": "image/png", "bytes": 10}],
              "model": "tiny-flux", "timings": {"total_ms": 1.0},
              "cost": {"gpu": "cpu", "gpu_seconds": 0.001, "usd": 0.0}}
    assert JobResult.model_validate(result).model_dump(exclude_none=True) == result
    err = {"error": {"type": "invalid_input", "message": "prompt: too long", "field": "prompt"}}
    assert JobError.model_validate(err).model_dump() == err
