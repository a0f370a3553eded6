"""Decode fetched bytes as an allowed image, the pixel cap checked from the header before a single
pixel is decoded (a 50 KB PNG can inflate to gigabytes). Only PNG, JPEG and WEBP: each extra
decoder is attack surface."""

from __future__ import annotations

import io

from app.errors import InvalidInput
from app.fetch.policy import FetchLimits


def decode_image(data: bytes, limits: FetchLimits = FetchLimits(), field: str = "image"):
    """Decode `data` as one of `limits.formats`, refusing more than `limits.max_pixels` before decoding."""
    from PIL import Image, UnidentifiedImageError

    allowed = " or ".join(limits.formats)
    try:
        im = Image.open(io.BytesIO(data), formats=list(limits.formats))  # reads the header only
    except Image.DecompressionBombError:  # PIL's own header check (2 x 89 Mpx), far above ours: same answer
        raise InvalidInput(f"{field}: image has more than {limits.max_pixels} pixels (decompression-bomb guard)",
                           field=field) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidInput(f"{field}: not a {allowed} image", field=field) from None
    width, height = im.size
    if width * height > limits.max_pixels:
        raise InvalidInput(f"{field}: image is {width}x{height}, more than {limits.max_pixels} pixels "
                           "(decompression-bomb guard)", field=field)
    try:
        im.load()  # first frame only: an animated WEBP's other frames are never decoded
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise InvalidInput(f"{field}: {im.format} image is corrupt or truncated", field=field) from None
    return im
