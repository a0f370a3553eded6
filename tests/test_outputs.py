"""Output encoding: lossless PNG at the fast zlib level, batches in job order, every format decodable."""

import io

import numpy as np
import pytest
from PIL import Image

from app.outputs import PNG_LEVEL, encode_image, encode_images


def _images(n, size=64):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size + i, 3), dtype=np.uint8)) for i in range(n)]


def test_png_is_lossless_at_the_fast_level():
    im = _images(1)[0]
    back = Image.open(io.BytesIO(encode_image(im, "png", 90)))
    assert back.format == "PNG" and np.array_equal(np.asarray(back), np.asarray(im))
    assert PNG_LEVEL <= 3  # the slow default (6) costs 4-5x on a 1024x1024 photo (bench encode)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_batch_keeps_job_order(fmt, n):
    ims = _images(n)
    blobs = encode_images(ims, fmt, 90)
    assert [Image.open(io.BytesIO(b)).size for b in blobs] == [im.size for im in ims]
    assert blobs == [encode_image(im, fmt, 90) for im in ims]  # same bytes as one by one


def test_rgba_png_keeps_alpha_and_jpeg_drops_it():
    im = Image.new("RGBA", (32, 32), (10, 20, 30, 40))
    assert Image.open(io.BytesIO(encode_image(im, "png", 90))).mode == "RGBA"
    assert Image.open(io.BytesIO(encode_image(im, "jpeg", 90))).mode == "RGB"
