"""Encode a job's outputs for storage: images as PNG (lossless), JPEG or WEBP."""

from __future__ import annotations

import io


def encode_image(image, fmt: str, quality: int) -> bytes:
    """PNG (lossless; quality ignored), JPEG or WEBP at `quality`."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.convert("RGB").save(buf, format=fmt.upper(), quality=quality)
    return buf.getvalue()
