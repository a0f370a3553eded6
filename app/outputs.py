"""Encode a job's outputs for storage: images as PNG (lossless), JPEG or WEBP (videos: app.video).

PNG uses zlib level 1: on a 1024x1024 photo it is 4-5x faster than PIL's default 6 for files about
12% larger, and noise costs the same at any level (`python -m bench encode`, bench/results/encode_*.json).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "mp4": "video/mp4"}

PNG_LEVEL = 1


def encode_image(image, fmt: str, quality: int) -> bytes:
    """PNG (lossless; quality ignored), JPEG or WEBP at `quality`."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=PNG_LEVEL)
    else:
        image.convert("RGB").save(buf, format=fmt.upper(), quality=quality)
    return buf.getvalue()


def encode_images(images: list, fmt: str, quality: int) -> list[bytes]:
    """Each image encoded, in order; a batch's encodes run side by side (zlib, libjpeg, libwebp release the GIL)."""
    if len(images) <= 1:
        return [encode_image(im, fmt, quality) for im in images]
    with ThreadPoolExecutor(max_workers=min(4, len(images))) as pool:
        return list(pool.map(lambda im: encode_image(im, fmt, quality), images))


@dataclass(frozen=True)
class Encoded:
    """One stored output: its bytes, content type and key extension, the fields its result entry adds
    (width, height, seed; a video's frames, fps, duration_s), the JobResult list it belongs to, and
    the poster (a video's first frame as PNG) stored beside it."""

    blob: bytes
    content_type: str
    ext: str
    meta: dict = field(default_factory=dict)
    kind: str = "images"  # images | videos
    poster: "Encoded | None" = None


def encode_image_outputs(images: list, job) -> list[Encoded]:
    """A job's images in its output format (the image families' `encode_outputs`)."""
    blobs = encode_images(images, job.output_format, job.output_quality)
    ctype = CONTENT_TYPES[job.output_format]
    return [Encoded(blob, ctype, job.output_format, dict(width=im.width, height=im.height, seed=seed))
            for im, blob, seed in zip(images, blobs, job.seeds)]
