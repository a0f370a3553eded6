"""Image-to-image on FLUX and SDXL through Service.run on the tiny models: the job picks the task by
sending an image; the img2img pipeline is built from the loaded one (no second copy of any weight).
"""

from __future__ import annotations

import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from app.families.base import derived_pipeline, synthetic_image
from app.fetch import FetchLimits

# Two steps at strength 0.5: one denoising step from the input. FLUX starts from pure noise (sigma 1)
# unless int(steps * (1 - strength)) >= 1: at 4 steps, strength 0.8 would ignore the input.
FAST = {"num_inference_steps": 2, "strength": 0.5}


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def uri(im: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(im)).decode()


CARD = synthetic_image(320, 256)  # 5:4, both sides multiples of 16 (the tiny models' minimum side is 256)
OTHER = synthetic_image(320, 256, seed=1).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
assert CARD.tobytes() != OTHER.tobytes()


@pytest.fixture(params=["flux", "sdxl"])
def service(request):
    return request.getfixturevalue(f"tiny_{request.param}_service")


def run(service, job_id, **raw):
    fast = FAST if "image" in raw else {"num_inference_steps": 2}
    out = service.run({"prompt": "a red sneaker", "seed": 7, **fast, **raw}, job_id)
    assert "error" not in out, out
    return out["images"]


_CARD_RUNS: dict = {}


def card_run(service):
    """The images of the job every test compares with (CARD, seed 7), run once per service."""
    if id(service) not in _CARD_RUNS:
        _CARD_RUNS[id(service)] = run(service, "i2i-a", image=uri(CARD))
    return _CARD_RUNS[id(service)]


def test_an_image_makes_it_img2img_at_the_image_size(service):
    steps = []
    out = service.run({"prompt": "a red sneaker", "seed": 7, "num_inference_steps": 4, "strength": 0.75,
                       "image": uri(CARD.resize((80, 64)))}, "i2i-size", progress=lambda s, t: steps.append((s, t)))
    assert [(im["width"], im["height"]) for im in out["images"]] == [(320, 256)]  # up to the minimum side
    assert steps == [(1, 3), (2, 3), (3, 3)]  # strength 0.75 of 4 steps: the noisiest one skipped
    assert out["timings"]["inputs_ms"] >= 0
    sized = run(service, "i2i-sized", image=uri(CARD), width=256, height=256)
    assert (sized[0]["width"], sized[0]["height"]) == (256, 256)  # the job's size wins; the input is fitted


def test_same_seed_same_bytes_each_seed_on_its_own_and_the_input_matters(service):
    text_before = run(service, "t2i-before")
    a = card_run(service)
    assert read(service, run(service, "i2i-a2", image=uri(CARD))) == read(service, a)  # same seed, same bytes
    batch = run(service, "i2i-batch", image=uri(CARD), num_images=2)
    alone = run(service, "i2i-alone", image=uri(CARD), seed=8)
    assert [im["seed"] for im in batch] == [7, 8]
    # each image of a batch depends on its own seed only (a batch of 2 rounds a level or two differently)
    assert np.abs(pixels(service, batch, 0) - pixels(service, a)).max() <= 2
    assert np.abs(pixels(service, batch, 1) - pixels(service, alone)).max() <= 2
    other_image = run(service, "i2i-other", image=uri(OTHER))
    assert len({read(service, x) for x in (a, alone, other_image)}) == 3
    # the pipelines share the scheduler object too: the img2img jobs left no state behind
    text_after = run(service, "t2i-after")
    assert read(service, text_before) == read(service, text_after)
    assert (text_after[0]["width"], text_after[0]["height"]) == (256, 256)  # the tiny default, not the input's


def test_from_pipe_shares_every_weight(service):
    fam, pipe = service.family, service.pipe
    twin = derived_pipeline(pipe, fam.img2img_class, fam.denoiser)
    assert type(twin).__name__ == fam.img2img_class
    assert derived_pipeline(pipe, fam.img2img_class, fam.denoiser) is twin  # built once
    for name, module in pipe.components.items():
        if hasattr(module, "parameters"):
            assert twin.components[name] is module, name
            for (pname, p), (_, q) in zip(module.named_parameters(), twin.components[name].named_parameters()):
                assert p.data_ptr() == q.data_ptr(), f"{name}.{pname} was copied"


def test_inputs_from_a_url_and_from_s3(tiny_flux_service, bucket, monkeypatch):
    import boto3

    service = tiny_flux_service
    boto3.client("s3").put_object(Bucket=bucket, Key="in/card.png", Body=png(CARD), ContentType="image/png")
    from_data = card_run(service)  # the same job as a data: URI
    from_s3 = run(service, "i2i-s3", image=f"s3://{bucket}/in/card.png")
    assert read(service, from_s3) == read(service, from_data)

    class One(BaseHTTPRequestHandler):
        def do_GET(self):
            body = png(CARD)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), One)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/card.png?X-Amz-Signature=secret"
    try:
        refused = service.run({"prompt": "a", "image": url}, "i2i-guarded")
        assert refused["error"]["field"] == "image" and "loopback" in refused["error"]["message"]
        assert "secret" not in refused["error"]["message"]
        monkeypatch.setattr(service, "fetch_limits", FetchLimits(allow_networks=("127.0.0.1/32",)))
        from_url = run(service, "i2i-url", image=url)
    finally:
        srv.shutdown()
        srv.server_close()
    assert read(service, from_url) == read(service, from_data)


def test_refusals_come_before_any_gpu_work(service, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("generate ran")

    monkeypatch.setattr(type(service.family), "generate", boom)
    for raw, field in [({"images": [uri(CARD), uri(CARD)]}, "images"),
                       ({"image": "data:image/png;base64,aGVsbG8="}, "image"),
                       ({"image": uri(CARD), "strength": 2}, "strength")]:
        out = service.run({"prompt": "a", **raw}, "i2i-refused")
        assert out["error"]["type"] == "invalid_input" and out["error"]["field"] == field, out


def read(service, images, i=0) -> bytes:
    return (service.store.root / images[i]["key"]).read_bytes()


def pixels(service, images, i=0):
    return np.asarray(Image.open(io.BytesIO(read(service, images, i))), dtype=np.int16)
