def test_tiny_flux_job_writes_an_image(tiny_flux_service, tmp_path):
    from pathlib import Path
    from urllib.parse import urlparse

    out = tiny_flux_service.run({"prompt": "a red cat", "seed": 3}, "smoke-1")
    assert "error" not in out, out
    img = out["images"][0]
    assert Path(urlparse(img["url"]).path).stat().st_size == img["bytes"] > 0
