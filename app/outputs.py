"""Encode a job's outputs for storage: images as PNG (lossless), JPEG or WEBP.

PNG uses zlib level 1: on a 1024x1024 photo it is 4-5x faster than PIL's default 6 for files about
12% larger, and noise costs the same at any level (`python -m bench encode`, bench/results/encode_*.json).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

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
