"""One model source, resolved once: every MODEL / WEIGHTS_URI kind, and everyone that reads it (results,
preflight's VRAM and CPU mode, the compile-cache key). The streamed case runs against moto's S3 server."""

from __future__ import annotations

import json

import boto3
import pytest

from app.checks import preflight_inputs
from app.config import Settings
from app.errors import WorkerBroken
from app.families.flux import FAMILY as FLUX
from app.families.sdxl import FAMILY as SDXL
from app.source import resolve
from weights.__main__ import bake


@pytest.fixture(scope="module")
def baked_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("src") / "baked-tiny"
    bake("tiny-flux", out, "fp8", device="cpu")
    return out


@pytest.fixture(scope="module")
def baked_plain(tmp_path_factory):
    """A bake of a plain diffusers folder (not an embedded name): the real model's defaults apply."""
    root = tmp_path_factory.mktemp("src-plain")
    FLUX.build_tiny().save_pretrained(root / "my-flux")
    bake(str(root / "my-flux"), root / "baked", "fp8", device="cpu")
    return root


def upload(root, bucket, prefix):
    s3 = boto3.client("s3")
    for p in sorted(root.rglob("*")):
        if p.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(root).as_posix()}", Body=p.read_bytes())


def test_embedded_tiny_model():
    src = resolve("tiny-sdxl")
    assert (src.kind, src.id, src.family.name, src.tiny, src.location) == ("tiny", "tiny-sdxl", SDXL.name, True, None)
    assert src.family.defaults == SDXL.tiny_defaults and src.family.shapes == ((256, 256),)
    assert src.vram_gib == {"bf16": 0.5}


def test_plain_folder_reads_its_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    src = resolve(str(tmp_path))
    assert (src.kind, src.id, src.family, src.tiny) == ("folder", str(tmp_path), SDXL, False)
    assert src.vram_gib == SDXL.vram_gib


def test_baked_folder_is_named_by_its_manifest(baked_tiny, baked_plain):
    tiny = resolve(str(baked_tiny))
    assert (tiny.kind, tiny.id, tiny.tiny, tiny.location) == ("baked", "tiny-flux", True, str(baked_tiny))
    plain = resolve(str(baked_plain / "baked"))
    assert (plain.kind, plain.id, plain.tiny) == ("baked", str(baked_plain / "my-flux"), False)
    assert plain.family.defaults == FLUX.defaults
    assert plain.vram_gib["fp8"] == plain.manifest["vram_gib"] == FLUX.vram_gib["fp8"]


def test_weights_uri_wins_and_reports_the_baked_model(baked_tiny, bucket, tmp_path):
    """The streamed tiny bake reports `tiny-flux` everywhere: results, preflight's VRAM, CPU mode."""
    from app.service import Service

    upload(baked_tiny, bucket, "w")
    settings = Settings(model="tiny-sdxl", weights_uri=f"s3://{bucket}/w", output_uri=str(tmp_path / "out"),
                        device="cpu", warmup=False, cache_dir=str(tmp_path / "cache"))
    src = resolve(settings.model, weights_uri=settings.weights_uri)
    assert (src.kind, src.id, src.family.name, src.tiny) == ("stream", "tiny-flux", FLUX.name, True)
    inputs = preflight_inputs(settings, src)
    assert inputs.embedded and inputs.vram_need("fp8") == 0.5 and inputs.model_label == "tiny-flux"
    service = Service.load(settings)
    out = service.run({"prompt": "a red cat", "seed": 1}, "stream-1")
    assert out["model"] == "tiny-flux" and (out["images"][0]["width"], out["images"][0]["height"]) == (256, 256)


@pytest.mark.parametrize("uri,needle", [("https://example.com/w", "not an s3:// URI"),
                                        ("s3:///no-bucket", "not an s3:// URI")])
def test_bad_weights_uri_names_the_variable(uri, needle):
    with pytest.raises(WorkerBroken, match=needle) as e:
        resolve("tiny-flux", weights_uri=uri)
    assert e.value.field == "WEIGHTS_URI"


def test_missing_or_foreign_manifest_names_the_variable(bucket, tmp_path, baked_tiny):
    with pytest.raises(WorkerBroken, match="manifest.json: NoSuchKey") as e:
        resolve("tiny-flux", weights_uri=f"s3://{bucket}/nothing")
    assert e.value.field == "WEIGHTS_URI"
    boto3.client("s3").put_object(Bucket=bucket, Key="other/manifest.json", Body=b'{"format": "x"}')
    with pytest.raises(WorkerBroken, match="is not diffusion-worker/baked") as e:
        resolve("tiny-flux", weights_uri=f"s3://{bucket}/other")
    assert e.value.field == "WEIGHTS_URI"


def test_a_manifest_naming_an_unknown_family_is_refused(baked_tiny, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(baked_tiny, copy)
    m = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**m, "family": "kandinsky"}))
    with pytest.raises(WorkerBroken, match="unknown model family 'kandinsky'") as e:
        resolve(str(copy))
    assert e.value.field == "MODEL"


def test_compile_cache_identity_names_kind_location_and_revision(baked_tiny):
    ids = {resolve("tiny-flux").cache_identity(), resolve("tiny-sdxl").cache_identity(),
           resolve(str(baked_tiny)).cache_identity()}
    assert len(ids) == 3 and all(":" in i for i in ids)
    assert str(baked_tiny) in resolve(str(baked_tiny)).cache_identity()
