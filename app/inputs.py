"""A job's input images, fetched and made ready for a pipeline before any GPU work.

`load_inputs(job, limits)` fetches each reference in job order through app.fetch (http(s) with the
address guard on every hop, data: URIs, s3:// with the worker's boto3 client; byte cap, pixel cap
before decoding, timeouts; PNG, JPEG and WEBP told apart by their bytes) and returns RGB PIL
images: EXIF orientation applied (a phone photo is stored sideways with a tag saying so), alpha
composited on white (the pipelines take three channels; a transparent product shot means a white
background, not a black one). Every refusal names its field (`image`, `images[1]`) and its reason.
"""

from __future__ import annotations

import time
from dataclasses import replace

from app.errors import InvalidInput, JobFailed
from app.fetch import FetchLimits, fetch_image

BACKGROUND = (255, 255, 255)  # what transparent pixels become
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale PNGs decode to these


def load_inputs(job, limits: FetchLimits = FetchLimits(), deadline: float | None = None) -> list:
    """The job's input images (RGB PIL images, job order); [] for a text job.

    `deadline` (time.monotonic) bounds all the fetches together: each gets the smaller of its own
    `limits.deadline_s` and what is left, so several slow sources cannot outlast the job.
    """
    out = []
    for ref, field in zip(job.inputs, job.input_fields):
        fetch_limits = limits
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobFailed(f"{field}: no time left to fetch it within the job's deadline", field=field)
            fetch_limits = replace(limits, deadline_s=min(limits.deadline_s, left))
        out.append(to_rgb(fetch_image(ref, fetch_limits, field), field))
    return out


def to_rgb(im, field: str = "image"):
    """`im` upright (EXIF orientation) in RGB, transparency composited on BACKGROUND."""
    from PIL import Image, ImageOps

    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # PIL raises assorted errors on malformed EXIF blocks; the caller must hear why
        raise InvalidInput(f"{field}: the image's EXIF metadata is malformed", field=field) from None
    if im.mode in _SIXTEEN_BIT:  # PIL's convert("RGB") clips 16-bit values instead of scaling them
        im = _eight_bit(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("L", "1") and "transparency" in im.info:
        im = im.convert("LA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _eight_bit(im):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.clip(np.asarray(im).astype("int64") >> 8, 0, 255).astype("uint8"), "L")
