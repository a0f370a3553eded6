"""python -m bench encode: the output encode a job pays after the pipeline (CPU work, no GPU needed).

PNG at each zlib level, JPEG and WEBP, on a photograph (matplotlib's sample photo, upscaled to
1024x1024) and on noise: noise is incompressible and flatters no encoder, a photo is what users
store. Also a batch of 4 encoded one after the other vs `app.outputs.encode_images` (the worker's
path, encodes overlapped on threads: zlib and libjpeg release the GIL). Median of 5.
"""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path

from app.outputs import PNG_LEVEL, encode_image, encode_images

REPEAT = 5


def photo(size: int = 1024):
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return Image.open(path).convert("RGB").resize((size, size), Image.LANCZOS)


def noise(size: int = 1024):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _median_ms(fn) -> tuple[float, int]:
    times, out = [], b""
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 1), len(out) if isinstance(out, bytes) else sum(map(len, out))


def _png(image, level: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def main(size: int = 1024) -> dict:
    from bench.latency import versions
    from bench.output import save_json

    rows = []
    for name, image in (("photo", photo(size)), ("noise", noise(size))):
        for level in (0, 1, 3, 6, 9):  # 6 is PIL's default
            ms, n = _median_ms(lambda: _png(image, level))
            rows.append(dict(image=name, format="png", level=level, ms=ms, bytes=n))
        for fmt in ("jpeg", "webp"):
            ms, n = _median_ms(lambda: encode_image(image, fmt, 90))
            rows.append(dict(image=name, format=fmt, quality=90, ms=ms, bytes=n))
        batch = [image] * 4
        seq_ms, _ = _median_ms(lambda: [encode_image(im, "png", 90) for im in batch])
        par_ms, _ = _median_ms(lambda: encode_images(batch, "png", 90))
        rows.append(dict(image=name, format="png", level=PNG_LEVEL, batch=4, sequential_ms=seq_ms,
                         worker_ms=par_ms))
    res = dict(bench="encode", size=size, worker_png_level=PNG_LEVEL, rows=rows, versions=versions())
    save_json(res, "encode")
    return res
