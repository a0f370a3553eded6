"""Input images: the job contract's fields (bounds and errors by name) and app.inputs.load_inputs
against real sources: a loopback HTTP server, data: URIs and moto's S3 server.

The address guard refuses loopback, so the URL tests open exactly 127.0.0.1/32 through
FetchLimits.allow_networks (the documented test seam); the private-address redirect stays refused.
"""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from http.server import BaseHTTPRequestHandler

import pytest
from PIL import Image

from app.errors import InvalidInput, JobFailed, WorkerError
from app.families.flux import FAMILY as FLUX
from app.families.flux_kontext import FAMILY as KONTEXT
from app.families.sdxl import FAMILY as SDXL
from app.fetch import FetchLimits
from app.inputs import load_inputs, to_rgb
from app.schema import parse_job
from tests.helpers_net import http_server

KiB = 1024
TEXT_ONLY = replace(FLUX, name="text-only", img2img_class=None)  # a family with no image task at all


def encoded(im: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


RED = encoded(Image.new("RGB", (64, 48), (200, 30, 30)))
URI = data_uri(RED)


# --- the contract -----------------------------------------------------------------------------------

def refused(raw, family=FLUX) -> InvalidInput:
    with pytest.raises(InvalidInput) as e:
        parse_job({"prompt": "a cat", **raw}, family)
    assert e.value.field in e.value.message, e.value.message
    return e.value


@pytest.mark.parametrize("family, raw, field, words", [
    (TEXT_ONLY, {"image": URI}, "image", "takes no input image"),
    (TEXT_ONLY, {"images": [URI]}, "images", "takes no input image"),
    (KONTEXT, {}, "image", "edits an input image"),
    (FLUX, {"image": URI, "images": [URI]}, "images", "not both"),
    (FLUX, {"images": []}, "images", "at least one"),
    (FLUX, {"images": [URI, URI]}, "images", "at most 1 input image"),
    (KONTEXT, {"images": [URI, URI]}, "images", "at most 1"),
    (FLUX, {"image": URI, "strength": 1.5}, "strength", "less than or equal to 1"),
    (FLUX, {"image": URI, "strength": -0.1}, "strength", "greater than or equal to 0"),
    (FLUX, {"image": URI, "strength": "0.5"}, "strength", "valid number"),
    (FLUX, {"image": URI, "strength": True}, "strength", "valid number"),
    (FLUX, {"image": URI, "strength": float("nan")}, "strength", "finite"),
    (FLUX, {"image": URI, "strength": 0.1, "num_inference_steps": 4}, "strength", "no denoising step"),
    (FLUX, {"strength": 0.5}, "strength", "send an image"),
    (KONTEXT, {"image": URI, "strength": 0.5}, "strength", "no image-to-image task"),
    (FLUX, {"image": "file:///etc/passwd"}, "image", "scheme file: not allowed"),
    (FLUX, {"image": "ftp://example.com/a.png"}, "image", "scheme ftp: not allowed"),
    (FLUX, {"image": "example.com/a.png"}, "image", "scheme (none) not allowed"),
    (FLUX, {"image": 5}, "image", "valid string"),
    (FLUX, {"image": "https://example.com/" + "a" * 9000}, "image", "longer than 8192"),
    (FLUX, {"image": "data:image/png;base64," + "A" * (28 * 1024 * 1024)}, "image", "byte limit"),
    (KONTEXT, {"images": [URI, "gopher://x/"]}, "images[1]", "scheme gopher: not allowed"),
    (KONTEXT, {"images": [URI, None]}, "images[1]", "valid string"),
    (FLUX, {"image": URI, "width": 512}, "height", "together"),
    (FLUX, {"image": URI, "height": 512}, "width", "together"),
    (FLUX, {"image": URI, "width": 1000, "height": 512}, "width", "multiple of 16"),
])
def test_input_fields_are_refused_by_name(family, raw, field, words):
    e = refused(raw, family)
    assert e.field == field, e.message
    assert words in e.message, e.message


def test_text_jobs_keep_their_defaults_and_image_jobs_wait_for_the_image():
    text = parse_job({"prompt": "a cat", "seed": 1}, FLUX)
    assert (text.width, text.height, text.strength, text.inputs) == (1024, 1024, None, ())
    assert not text.size_from_input
    job = parse_job({"prompt": "a cat", "image": URI, "seed": 1}, FLUX)
    assert (job.width, job.height, job.strength, job.inputs, job.input_fields) == (None, None, 0.8, (URI,), ("image",))
    assert job.size_from_input
    assert parse_job({"prompt": "a", "image": URI, "strength": 0.3}, SDXL).strength == 0.3
    many = parse_job({"prompt": "a", "images": [URI]}, KONTEXT)
    assert many.inputs == (URI,) and many.input_fields == ("images[0]",) and many.strength is None
    sized = parse_job({"prompt": "a", "image": URI, "width": 512, "height": 768}, FLUX)
    assert FLUX.output_size(sized, [Image.new("RGB", (64, 48))]) == (512, 768)


@pytest.mark.parametrize("family, size, expected", [
    (FLUX, (64, 48), (336, 256)),  # scaled up to the minimum side, aspect kept
    (FLUX, (1000, 750), (1008, 752)),  # rounded to the multiple of 16
    (FLUX, (4000, 3000), (2048, 1536)),  # the 2048 side binds before the 2048^2 pixel cap
    (FLUX, (10000, 100), (2048, 256)),  # an extreme strip: both side bounds win over the aspect
    (SDXL, (4032, 3024), (1776, 1328)),  # SDXL's 1536^2 pixel cap
    (KONTEXT, (4032, 3024), (1184, 880)),  # Kontext's ~1 MP
])
def test_output_size_follows_the_first_image(family, size, expected):
    w, h = family.fit_size(*size)
    assert w % family.multiple == 0 and h % family.multiple == 0
    assert family.min_side <= min(w, h) and max(w, h) <= family.max_side
    assert w * h <= family.max_pixels
    if size != (10000, 100):
        assert abs(w / h - size[0] / size[1]) < 0.05
    job = parse_job({"prompt": "a", "image": URI}, family).with_size(w, h)
    assert (job.width, job.height) == (w, h) and not job.size_from_input


def test_resolved_size_still_bounds_the_outputs():
    big = replace(FLUX, max_side=4096, max_pixels=4096 * 4096)
    job = parse_job({"prompt": "a", "image": URI, "num_images": 4}, big)
    assert job.with_size(2048, 2048).width == 2048
    with pytest.raises(InvalidInput) as e:
        job.with_size(*big.fit_size(4096, 4096))
    assert e.value.field == "num_images"


# --- the sources ------------------------------------------------------------------------------------

class Routes(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    bodies: dict = {}

    def log_message(self, *a):
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/to-private":
            self.send_response(302)
            self.send_header("Location", "http://10.0.0.7/red.png")
            self.end_headers()
            return
        body, ctype = self.bodies.get(path, (b"", None))
        self.send_response(200 if ctype else 404)
        self.send_header("Content-Type", ctype or "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    with http_server(Routes) as url:
        yield url


def gif() -> bytes:
    return encoded(Image.new("RGB", (8, 8)), "GIF")


Routes.bodies = {
    "/red.png": (RED, "image/png"),
    "/blue.jpg": (encoded(Image.new("RGB", (40, 30), (0, 0, 255)), "JPEG"), "image/jpeg"),
    "/big.png": (encoded(Image.effect_noise((400, 400), 100).convert("RGB")), "image/png"),  # ~480 KB
    "/huge.png": (encoded(Image.new("L", (3000, 3000))), "image/png"),  # 9 Mpx in a few KB
    "/anim.gif": (gif(), "application/octet-stream"),  # the bytes decide, not the label
    "/note.txt": (b"hello, I am not an image", "application/octet-stream"),
    "/cut.png": (RED[: len(RED) // 2], "image/png"),
}
LIMITS = FetchLimits(allow_networks=("127.0.0.1/32",), max_bytes=256 * KiB, max_pixels=4_000_000,
                     connect_timeout_s=1.0, read_timeout_s=1.0, deadline_s=3.0)


def job_with(*refs, family=KONTEXT):
    raw = {"prompt": "a", "image": refs[0]} if len(refs) == 1 else {"prompt": "a", "images": list(refs)}
    return parse_job(raw, replace(family, max_images=max(len(refs), 1)))


def load_refused(*refs, limits=LIMITS, err=InvalidInput) -> WorkerError:
    with pytest.raises(err) as e:
        load_inputs(job_with(*refs), limits)
    assert e.value.field in e.value.message
    return e.value


def test_each_source_loads_in_job_order(server, bucket):
    import boto3

    from app.storage import s3_client

    boto3.client("s3").put_object(Bucket=bucket, Key="in/green.webp", ContentType="image/webp",
                                  Body=encoded(Image.new("RGB", (24, 16), (0, 255, 0)), "WEBP", lossless=True))
    limits = replace(LIMITS, s3_client=s3_client(max_attempts=1))
    refs = (f"{server}/red.png", URI, f"s3://{bucket}/in/green.webp", f"{server}/blue.jpg")
    images = load_inputs(job_with(*refs), limits)
    assert [im.size for im in images] == [(64, 48), (64, 48), (24, 16), (40, 30)]
    assert all(im.mode == "RGB" for im in images)
    assert images[0].getpixel((0, 0)) == (200, 30, 30) and images[2].getpixel((3, 3)) == (0, 255, 0)
    assert max(abs(a - b) for a, b in zip(images[3].getpixel((5, 5)), (0, 0, 255))) < 8  # JPEG


@pytest.mark.parametrize("path, words", [
    ("/big.png", "byte limit"),
    ("/huge.png", "more than 4000000 pixels"),
    ("/anim.gif", "not a PNG or JPEG or WEBP image"),
    ("/note.txt", "not a PNG or JPEG or WEBP image"),
    ("/cut.png", "corrupt or truncated"),
    ("/to-private", "private address; refused"),
    ("/missing.png", "HTTP 404"),
])
def test_each_refusal_names_the_field(server, path, words):
    e = load_refused(URI, f"{server}{path}")
    assert e.field == "images[1]" and words in e.message, e.message


def test_refusals_of_data_uris_and_s3_objects(bucket):
    import boto3

    from app.storage import s3_client

    boto3.client("s3").put_object(Bucket=bucket, Key="in/anim.gif", Body=gif())
    limits = replace(LIMITS, s3_client=s3_client(max_attempts=1))
    for ref, words in [(data_uri(gif(), "image/gif"), "content type image/gif"),
                       (data_uri(gif(), "application/octet-stream"), "not a PNG"),
                       (data_uri(b"\0" * (300 * KiB)), "byte limit"),
                       (f"s3://{bucket}/in/anim.gif", "not a PNG"),
                       (f"s3://{bucket}/in/none.png", "not found")]:
        e = load_refused(ref, limits=limits)
        assert e.field == "image" and words in e.message, (ref[:40], e.message)


def test_loopback_stays_refused_without_the_seam(server):
    e = load_refused(f"{server}/red.png", limits=FetchLimits())
    assert e.field == "image" and "loopback" in e.message


def test_the_job_deadline_bounds_all_fetches():
    with pytest.raises(JobFailed) as e:
        load_inputs(job_with(URI, URI), LIMITS, deadline=0.0)
    assert e.value.field == "images[0]" and "deadline" in e.value.message


# --- what the pipeline gets -------------------------------------------------------------------------

def test_exif_orientation_is_applied():
    im = Image.new("RGB", (60, 20), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 10, 20))  # a red band at the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": a phone held upright
    job = job_with(data_uri(encoded(im, "JPEG", exif=exif, quality=95), "image/jpeg"))
    (out,) = load_inputs(job, LIMITS)
    assert out.size == (20, 60)  # upright
    r, g, b = out.getpixel((10, 3))  # the left band is now at the top
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("mode, pixel, expected", [
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent: the white background
    ("RGBA", (255, 0, 0, 255), (255, 0, 0)),  # opaque: itself
    ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half: blended over white
    ("LA", (0, 0), (255, 255, 255)),
    ("L", 77, (77, 77, 77)),
])
def test_alpha_is_composited_on_white(mode, pixel, expected):
    (out,) = load_inputs(job_with(data_uri(encoded(Image.new(mode, (8, 8), pixel)))), LIMITS)
    assert out.mode == "RGB"
    assert all(abs(a - b) <= 1 for a, b in zip(out.getpixel((4, 4)), expected)), out.getpixel((4, 4))


def test_palette_transparency_and_sixteen_bit_grey():
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    assert to_rgb(Image.open(io.BytesIO(encoded(pal)))).getpixel((1, 1)) == (255, 255, 255)
    grey16 = Image.new("I;16", (8, 8), 40000)
    out = to_rgb(Image.open(io.BytesIO(encoded(grey16))))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (156, 156, 156)  # 40000 >> 8, not clipped to 255
