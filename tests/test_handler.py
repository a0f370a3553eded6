"""handler.py through the real runpod SDK (`--test_input`), each in its own process as RunPod runs it.

Each process builds the tiny model (~20 s of imports on a small machine), so the four run at once.
The S3 run has an STS session (AWS_SESSION_TOKEN) and the SDK at DEBUG (`--rp_log_level DEBUG`, which
prints every handler output): the SDK's own `Job result` line must come out scrubbed, so the URL it
prints is checked for its redaction and the object is read from the store itself.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest

from tests.conftest import AWS_ENV

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red sneaker on a beach"
SESSION_TOKEN = "FwoGZXIvYXdzEJr//////////wEaDHsts+session/token=="  # STS-shaped: '/', '+', '='
JOBS = {
    "folder": {"prompt": PROMPT, "seed": 7},
    "s3": {"prompt": PROMPT, "seed": 7, "output_format": "webp"},
    "empty_prompt": {"prompt": ""},
    "huge_width": {"prompt": "x", "width": 100000},
}


@pytest.fixture(scope="module")
def runs(s3_endpoint, tmp_path_factory):
    """{name: (exit code, output, folder)} for every job in JOBS, run in parallel processes."""
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="a",
                 aws_secret_access_key="b").create_bucket(Bucket="handler-out")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RUNPOD_", "OUTPUT_", "MODEL"))}
    base.update(DEVICE="cpu")  # preflight runs, as in production: on a CPU it plans the fp32 reference path
    procs = {}
    for name, job in JOBS.items():
        folder = tmp_path_factory.mktemp(f"handler-{name}")
        env = dict(base, OUTPUT_URI=str(folder))
        if name in ("empty_prompt", "huge_width"):
            env["WARMUP"] = "0"  # refused before any denoising: the warm-up would only cost time
        cmd = [sys.executable, "handler.py", "--test_input", json.dumps({"input": job})]
        if name == "s3":
            env.update(AWS_ENV, AWS_ENDPOINT_URL_S3=s3_endpoint, OUTPUT_URI="s3://handler-out/renders",
                       AWS_SESSION_TOKEN=SESSION_TOKEN)
            cmd += ["--rp_log_level", "DEBUG"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs[name] = (proc, folder)
    out = {}
    for name, (proc, folder) in procs.items():
        text, _ = proc.communicate(timeout=240)
        out[name] = (proc.returncode, text, folder)
    return out


def result_urls(text: str) -> list[str]:
    """The image URLs of the job result the SDK prints."""
    (line,) = [ln for ln in text.splitlines() if "Job result:" in ln]
    return re.findall(r"'url': '([^']+)'", line)


def test_folder_output(runs):
    code, text, folder = runs["folder"]
    assert code == 0, text
    (url,) = result_urls(text)
    assert url == (folder / "local_test" / "0.png").as_uri()
    data = Path(urlparse(url).path).read_bytes()
    assert data.startswith(b"\x89PNG") and f"'bytes': {len(data)}" in text
    assert "'seed': 7" in text and "'cold_start'" in text
    assert "sneaker" not in text  # neither our log nor the SDK's prints the prompt
    assert "Traceback" not in text


def test_s3_output(runs, s3_endpoint):
    """The SDK prints the result (twice at DEBUG); each printed URL has its query scrubbed."""
    code, text, _ = runs["s3"]
    assert code == 0, text
    (url,) = result_urls(text)
    assert url.startswith(f"{s3_endpoint}/handler-out/renders/local_test/0.webp?")
    for param in ("X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token"):
        assert f"{param}=REDACTED" in url
    assert "Handler output:" in text  # the DEBUG lines were printed, and scrubbed as well
    body = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="a",
                        aws_secret_access_key="b").get_object(Bucket="handler-out",
                                                              Key="renders/local_test/0.webp")["Body"].read()
    assert body[8:12] == b"WEBP" and f"'bytes': {len(body)}" in text
    from urllib.parse import quote

    for secret in (AWS_ENV["AWS_SECRET_ACCESS_KEY"], AWS_ENV["AWS_ACCESS_KEY_ID"], SESSION_TOKEN,
                   quote(SESSION_TOKEN, safe=""), SESSION_TOKEN[:16]):
        assert secret not in text
    assert not re.search(r"X-Amz-(Signature|Credential|Security-Token)=(?!REDACTED)", text)


def test_local_mode_sends_no_progress_updates(runs):
    """No job-done URL in local mode: no progress POSTs, so no ERROR line per denoising step."""
    for name, (_, text, _) in runs.items():
        assert "Failed to return job results" not in text and "JOB_DONE_URL" not in text, name
        assert "ERROR  |" not in text or name in ("empty_prompt", "huge_width"), name


@pytest.mark.parametrize("name, field", [("empty_prompt", "prompt"), ("huge_width", "width")])
def test_invalid_input_fails_the_job_naming_the_field(runs, name, field):
    """RunPod's `error` is a string: our typed error as JSON, printed by the SDK as it is."""
    code, text, folder = runs[name]
    assert code != 0, text
    (line,) = [ln for ln in text.splitlines() if "failed with error:" in ln]
    error = json.loads(line.split("failed with error: ", 1)[1])
    assert error["field"] == field and error["type"] == "invalid_input" and error["message"].startswith(field)
    assert "Traceback" not in text
    assert not any(folder.iterdir())  # nothing written
