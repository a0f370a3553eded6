"""Streaming a baked directory from a real S3 endpoint (moto's server on loopback)."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
import torch

from app.families.flux import FAMILY as FLUX
from weights.fp8 import FP8Linear
from weights.__main__ import bake
from weights.errors import IntegrityError
from weights.load import Target, load_baked
from weights.stream import WORKERS, read_manifest, stream_baked as _stream_baked

CPU = Target("cpu", torch.float32)


def stream_baked(uri: str, target: Target, cache_dir):
    """The weights package's stream of the baked directory at `uri`, as app.loading drives it."""
    from app.storage import describe_s3_error, parse_s3_uri, s3_client

    bucket, prefix = parse_s3_uri(uri)
    client = s3_client(max_pool_connections=WORKERS)
    manifest = read_manifest(client, bucket, prefix, describe_s3_error)
    return _stream_baked(client, bucket, prefix, manifest, target, cache_dir, describe_s3_error)


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    """Small shards (several files) and small chunks (several ranged reads per file)."""
    import weights.manifest as mf
    import weights.serialize as ser

    out = tmp_path_factory.mktemp("bake") / "tiny-fp8"
    mp = pytest.MonkeyPatch()
    mp.setattr(ser, "MAX_SHARD_BYTES", 40_000)
    mp.setattr(mf, "HASH_CHUNK_BYTES", 16_384)
    try:
        bake("tiny-flux", out, "fp8", device="cpu")
    finally:
        mp.undo()
    return out


def upload(root: Path, bucket: str, prefix: str) -> list[str]:
    s3 = boto3.client("s3")
    keys = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            key = f"{prefix}/{p.relative_to(root).as_posix()}"
            s3.put_object(Bucket=bucket, Key=key, Body=p.read_bytes())
            keys.append(key)
    return keys


def shard_key(prefix: str, root: Path) -> tuple[str, bytes]:
    p = next((root / "transformer").glob("*.safetensors"))
    return f"{prefix}/transformer/{p.name}", p.read_bytes()


def test_stream_loads_a_working_pipeline(baked, bucket, tmp_path, monkeypatch):
    import weights.manifest as mf
    import weights.stream as stream

    monkeypatch.setattr(stream, "HEAD_BYTES", 64)  # every header is longer: the second header read runs
    assert len(list((baked / "transformer").glob("*.safetensors"))) > 2
    assert max(len(f["chunks"]) for f in mf.read(baked)["files"].values()) > 2
    upload(baked, bucket, "models/tiny")
    pipe = stream_baked(f"s3://{bucket}/models/tiny", CPU, tmp_path / "cache")
    assert type(pipe).__name__ == FLUX.pipeline_class
    layer = pipe.transformer.transformer_blocks[0].attn.to_qkv
    assert isinstance(layer, FP8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    local = load_baked(baked, CPU).transformer.state_dict()  # the same bytes as the local load
    streamed = pipe.transformer.state_dict()
    assert streamed.keys() == local.keys()
    assert all(torch.equal(streamed[k].view(torch.uint8), local[k].view(torch.uint8)) for k in local)
    image = pipe(prompt="a cat", width=256, height=256, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 256, 256, 3)


def test_service_streams_from_weights_uri(baked, bucket, tmp_path):
    from app.config import Settings
    from app.service import Service

    upload(baked, bucket, "w")
    svc = Service.load(Settings(weights_uri=f"s3://{bucket}/w", output_uri=str(tmp_path / "out"), preflight=False,
                                device="cpu", warmup=False, cache_dir=str(tmp_path / "cache")))
    assert type(svc.pipe.transformer.proj_out.weight) is torch.nn.Parameter
    assert isinstance(svc.pipe.transformer.transformer_blocks[0].ff.net[2], FP8Linear)
    # The manifest's source decides the defaults: a streamed tiny-flux is still the tiny model.
    assert svc.source.id == "tiny-flux" and svc.family.defaults == FLUX.tiny_defaults


def test_truncated_object_fails_before_loading(baked, bucket, tmp_path):
    upload(baked, bucket, "t")
    key, data = shard_key("t", baked)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data[:-1000])
    with pytest.raises(IntegrityError, match=r"bytes, the manifest says \d+ \(truncated or replaced\)"):
        stream_baked(f"s3://{bucket}/t", CPU, tmp_path / "cache")


def test_altered_object_fails_on_chunk_hash(baked, bucket, tmp_path):
    upload(baked, bucket, "a")
    key, data = shard_key("a", baked)
    altered = bytearray(data)
    altered[-10] ^= 0x01
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=bytes(altered))
    with pytest.raises(IntegrityError, match=r"chunk \d+ .* sha256 differs from the manifest \(altered\)"):
        stream_baked(f"s3://{bucket}/a", CPU, tmp_path / "cache")


def test_missing_object_fails(baked, bucket, tmp_path):
    keys = upload(baked, bucket, "m")
    boto3.client("s3").delete_object(Bucket=bucket, Key=next(k for k in keys if k.endswith("vae/config.json")))
    with pytest.raises(IntegrityError, match=r"m/vae/config.json: (404|NoSuchKey)"):
        stream_baked(f"s3://{bucket}/m", CPU, tmp_path / "cache")


def test_missing_manifest_fails(bucket, tmp_path):
    with pytest.raises(IntegrityError, match="manifest.json: NoSuchKey"):
        stream_baked(f"s3://{bucket}/nothing", CPU, tmp_path / "cache")


def test_stream_through_the_bench_endpoint(baked, tmp_path, monkeypatch):
    """bench.s3_static, the loopback endpoint of the GPU streaming measurement, serves what the
    streamer asks (HEAD, ranged GETs, path-style) and 404s a missing key."""
    import threading

    from bench.s3_static import make_server

    server = make_server(baked.parent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "bench")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "bench")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        pipe = stream_baked(f"s3://bench/{baked.name}", CPU, tmp_path / "cache")
        local = load_baked(baked, CPU).transformer.state_dict()
        streamed = pipe.transformer.state_dict()
        assert all(torch.equal(streamed[k].view(torch.uint8), local[k].view(torch.uint8)) for k in local)
        with pytest.raises(IntegrityError, match="manifest.json: (404|NoSuchKey)"):
            stream_baked("s3://bench/nothing-here", CPU, tmp_path / "cache2")
    finally:
        server.shutdown()



def test_the_stream_client_keeps_a_connection_per_thread(baked, bucket, tmp_path, monkeypatch):
    # botocore keeps 10 connections by default; the stream's 16 threads would reconnect per chunk.
    import weights.stream as stream

    import app.storage
    from app.loading import load_pipeline
    from app.source import resolve
    from preflight import Plan

    made = []
    real = app.storage.s3_client
    monkeypatch.setattr(app.storage, "s3_client", lambda **kw: made.append(real(**kw)) or made[-1])  # a spy
    upload(baked, bucket, "models/pool")
    source = resolve("tiny-flux", weights_uri=f"s3://{bucket}/models/pool")  # reads the manifest
    load_pipeline(source, Plan("cpu", "fp32"), str(tmp_path / "cache"))  # streams the rest
    assert made and [c.meta.config.max_pool_connections for c in made] == [stream.WORKERS] * len(made)
