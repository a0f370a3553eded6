"""app.video against the bounds app.limits promises, and a video stored to S3 (moto's server on loopback)."""

import httpx
import numpy as np
import pytest
from PIL import Image

from app.limits import video_bytes_bound
from app.video import crf, encode_mp4, encode_webp


def noise(frames, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(frames, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["mp4", "webp"])
def test_noise_at_top_quality_stays_under_the_bound(fmt):
    """Noise is the encoders' worst case: the bound parse_job checks before any GPU work must hold on it."""
    frames = noise(17, 96, 128)
    blob = (encode_mp4 if fmt == "mp4" else encode_webp)(frames, 16, 100)
    assert len(blob) <= video_bytes_bound(fmt, 128, 96, 17, 16)


def test_quality_maps_to_crf():
    assert (crf(100), crf(90), crf(50), crf(1)) == (12, 16, 32, 51)


def test_webp_frames_and_timing():
    import io

    im = Image.open(io.BytesIO(encode_webp(noise(5, 32, 48), 8)))
    assert im.n_frames == 5
    im.seek(1)
    im.load()  # PIL reads a frame's duration when it decodes it
    assert im.info["duration"] == 125 and im.info["loop"] == 0


def test_video_stored_to_s3_presigned_url_returns_its_bytes(bucket, tmp_path):
    from app.service import Service
    from app.storage import open_store
    from tests.test_wan_i2v import IMAGE

    from app.config import Settings

    svc = Service.load(Settings(model="tiny-wan-i2v", output_uri=f"s3://{bucket}/clips", preflight=False,
                                device="cpu", warmup=False), store=open_store(f"s3://{bucket}/clips", 3600))
    out = svc.run({"prompt": "a red sneaker", "image": IMAGE, "seed": 2}, "job-s3v")
    assert "error" not in out, out
    (v,) = out["videos"]
    assert v["key"] == "clips/job-s3v/0.mp4" and v["poster"]["key"] == "clips/job-s3v/0.poster.png"
    for entry, ctype in ((v, "video/mp4"), (v["poster"], "image/png")):
        r = httpx.get(entry["url"])
        assert r.status_code == 200 and r.headers["content-type"] == ctype == entry["content_type"]
        assert len(r.content) == entry["bytes"]
    import av
    import io

    with av.open(io.BytesIO(httpx.get(v["url"]).content)) as c:
        assert sum(1 for _ in c.decode(video=0)) == v["frames"] == 9
