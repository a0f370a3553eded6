"""The S3 part of bench.weights_load: baked shards from moto's S3 server on loopback to the GPU.

Moto is a Python (werkzeug) server: its throughput, not S3's, is likely the limit here, so this
figure is a floor for our reader (parallel ranged GETs, chunk hashes, pinned buffers, H2D copies).
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def s3_phase(root: Path, results: dict, gb: float, phase) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    from weights import manifest as mf
    from weights.stream import WORKERS, _Fetcher, _shards

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}")
    try:
        manifest = mf.read(root)
        names, total = [], 0
        for n in sorted(k for k in manifest["files"] if k.endswith(".safetensors")):
            if total >= gb * 1e9:
                break
            names.append(n)
            total += manifest["files"][n]["size"]
        from app.storage import s3_client

        client = s3_client(read_timeout=120)
        client.create_bucket(Bucket="bench")
        for n in names:
            boto3.client("s3").upload_file(str(root / n), "bench", f"baked/{n}")
        with ThreadPoolExecutor(WORKERS) as pool, phase(results, "s3", total) as rec:
            fetcher = _Fetcher(client, "bench", "baked", manifest, pool)
            on_gpu = []
            for name, tensors, _ in _shards(fetcher, names, pinned=True):
                # Blocking copies, as the loader does: the host buffer is freed right after.
                on_gpu += [t.to("cuda") for t in tensors.values()]
            torch.cuda.synchronize()
            rec.update(files=len(names), endpoint="moto ThreadedMotoServer on 127.0.0.1", workers=WORKERS)
            del on_gpu
    finally:
        server.stop()
