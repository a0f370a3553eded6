"""Shared fixtures: a real S3 endpoint on loopback (moto's server mode) and tiny services.

boto3 talks to it over HTTP exactly as production talks to AWS, R2 or MinIO: nothing is patched.
"""

from __future__ import annotations

import os

# One intra-op thread for torch in this process and the workers it starts (read when torch is
# imported, so set before): the tiny models' ops are too small to gain from a second thread, and on a 2-core machine
# shared with other runs OpenMP's spinning threads made a tiny job 10x slower (measured: 1.7 s vs 26 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402

from app.config import Settings  # noqa: E402

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def captured_logs(level: str = "DEBUG"):
    """The loguru lines at `level` and above emitted while the block runs (as the worker logs them)."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level=level)
    try:
        yield lines
    finally:
        logger.remove(sink)


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3 server on 127.0.0.1 for the whole test session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """Environment pointing boto3 at the loopback endpoint (as a deployment would set it)."""
    env = dict(AWS_ENV, AWS_ENDPOINT_URL_S3=s3_endpoint)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return env


@pytest.fixture
def bucket(s3_env, request):
    """A fresh bucket (named after the test) on the loopback endpoint; returns its name."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-b"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_auth(s3_endpoint, s3_env, bucket):
    """moto with request signing enforced (its own /moto-api/reset-auth switch) and one IAM user without
    any policy: yields (bucket, that user's key id, its secret); signing is switched off afterwards."""
    import urllib.request

    import boto3

    iam = boto3.client("iam", endpoint_url=s3_endpoint)
    iam.create_user(UserName=bucket)
    key = iam.create_access_key(UserName=bucket)["AccessKey"]

    def switch(value: str) -> None:
        req = urllib.request.Request(f"{s3_endpoint}/moto-api/reset-auth", data=value.encode(),
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req).read()

    switch("0")
    yield bucket, key["AccessKeyId"], key["SecretAccessKey"]
    switch("inf")


@pytest.fixture(scope="session")
def tiny_flux_service(tmp_path_factory):
    """A loaded tiny-flux Service writing to a temporary folder (shared: loading costs seconds)."""
    from app.service import Service

    out = tmp_path_factory.mktemp("outputs")
    return Service.load(Settings(model="tiny-flux", output_uri=str(out), preflight=False, device="cpu"))


@pytest.fixture(scope="session")
def tiny_sdxl_service(tmp_path_factory):
    from app.service import Service

    out = tmp_path_factory.mktemp("outputs-sdxl")
    return Service.load(Settings(model="tiny-sdxl", output_uri=str(out), preflight=False, device="cpu"))
