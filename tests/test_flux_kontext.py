"""FLUX.1 Kontext on its tiny model through Service.run: a required reference image, the output
size from it, same seed same bytes, the reference's tokens in the denoiser's inputs."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from app.config import Settings
from app.families import family_for_pipeline_class, family_for_tiny
from app.families.base import synthetic_image
from app.families.flux import FAMILY as FLUX
from app.families.flux_kontext import FAMILY as KONTEXT


def uri(im) -> str:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from app.service import Service

    return Service.load(Settings(model="tiny-flux-kontext", output_uri=str(tmp_path_factory.mktemp("kontext")),
                                 preflight=False, device="cpu"))


def test_registry_and_recipe():
    assert family_for_pipeline_class("FluxKontextPipeline") is KONTEXT and family_for_tiny("tiny-flux-kontext") is KONTEXT
    assert (KONTEXT.defaults.steps, KONTEXT.defaults.guidance) == (28, 2.5)
    assert KONTEXT.quant_skip == FLUX.quant_skip and KONTEXT.requires_image and KONTEXT.max_images == 1


def test_edit_through_the_service(service):
    assert type(service.pipe).__name__ == "FluxKontextPipeline"
    card = uri(synthetic_image(320, 256))
    job = {"prompt": "make it red", "image": card, "seed": 3, "num_inference_steps": 2}
    a, b = service.run(job, "k-a"), service.run(job, "k-b")
    assert [(im["width"], im["height"]) for im in a["images"]] == [(320, 256)]
    read = lambda out: (service.store.root / out["images"][0]["key"]).read_bytes()  # noqa: E731
    assert read(a) == read(b)
    other = service.run({**job, "image": uri(synthetic_image(320, 256, seed=5))}, "k-c")
    assert read(other) != read(a)  # the reference image is used
    missing = service.run({"prompt": "make it red"}, "k-d")
    assert missing["error"]["field"] == "image"


def test_denoiser_inputs_append_the_reference_tokens(service):
    pipe = service.pipe
    inputs = KONTEXT.denoiser_inputs(pipe, 256, 256)
    plain = FLUX.denoiser_inputs(pipe, 256, 256)
    assert inputs["hidden_states"].shape[1] == 2 * plain["hidden_states"].shape[1]
    assert inputs["img_ids"].shape[0] == 2 * plain["img_ids"].shape[0]
    out = pipe.transformer(**inputs)[0]
    assert out.shape == inputs["hidden_states"].shape
