"""Encode a video family's output (uint8 frames [frames, height, width, 3]) for storage, with a PNG poster.

MP4 is H.264 High, yuv420p, through PyAV (its wheels ship FFmpeg with libx264: nothing is downloaded
or looked up at run time), `+faststart` so a browser plays it before the whole file arrives. Quality
maps to x264's CRF (output_quality 90 -> CRF 16, 75 -> 22, 50 -> 32) under a VBV rate cap
(app.limits MP4_BITS_PER_PIXEL), which is what lets app.limits bound the file before any GPU work.
WEBP is animated lossy WebP (PIL's libwebp) at the job's quality, looping. The poster is the first
frame as PNG (app.outputs: zlib level 1).
"""

from __future__ import annotations

import io
import os
import tempfile

from app.limits import MP4_BITS_PER_PIXEL, MP4_BUFFER_S
from app.outputs import CONTENT_TYPES, Encoded, encode_image

X264_PRESET = "fast"  # 81 frames of 832x480 in well under a second on a few cores; "medium" is ~2x slower


def crf(quality: int) -> int:
    """output_quality 1-100 -> x264 CRF (lower is better): 100 -> 12, 90 -> 16, 50 -> 32, 1 -> 51."""
    return min(51, round(12 + (100 - quality) * 0.4))


def encode_mp4(frames, fps: int, quality: int = 90) -> bytes:
    """H.264 yuv420p in an MP4 (faststart), one frame per array in `frames`, at `fps`."""
    # faststart rewrites the file to move the index first: FFmpeg reopens it by name, so not a BytesIO
    with tempfile.TemporaryDirectory(prefix="mp4-") as tmp:
        path = os.path.join(tmp, "out.mp4")
        _write_mp4(path, frames, fps, quality)
        with open(path, "rb") as f:
            return f.read()


def _write_mp4(path: str, frames, fps: int, quality: int) -> None:
    import av

    n, height, width, _ = frames.shape
    rate = int(MP4_BITS_PER_PIXEL * width * height * fps)
    with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf(quality)), "preset": X264_PRESET, "maxrate": str(rate),
                          "bufsize": str(int(rate * MP4_BUFFER_S))}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def encode_webp(frames, fps: int, quality: int = 90) -> bytes:
    """Animated lossy WebP, looping, each frame shown 1/fps s (rounded to WebP's milliseconds)."""
    from PIL import Image

    images = [Image.fromarray(a, "RGB") for a in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="WEBP", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                   loop=0, quality=quality, method=4)
    return buf.getvalue()


ENCODERS = {"mp4": encode_mp4, "webp": encode_webp}


def encode_video(frames, job) -> Encoded:
    """One video in the job's format, its first frame as the PNG poster, and its result fields."""
    from PIL import Image

    n, height, width, _ = frames.shape
    blob = ENCODERS[job.output_format](frames, job.fps, job.output_quality)
    poster = Encoded(encode_image(Image.fromarray(frames[0], "RGB"), "png", 100), CONTENT_TYPES["png"], "poster.png")
    meta = dict(width=width, height=height, frames=n, fps=job.fps, duration_s=round(n / job.fps, 3), seed=job.seed)
    return Encoded(blob, CONTENT_TYPES[job.output_format], job.output_format, meta, kind="videos", poster=poster)
