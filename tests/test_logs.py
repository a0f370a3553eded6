"""Logging: JSON lines carrying the job id, no prompts at INFO, no credentials or URL signatures."""

import io
import json
import sys

import pytest
from loguru import logger

from app.config import secret_values
from app.logs import configure_logging, redact, strip_query
from app.storage import open_store
from tests.conftest import AWS_ENV

FAST = {"num_inference_steps": 2}
# The tiny tokenizer knows these words; past 77 tokens they are cut, and diffusers' own warning
# used to print the cut-off words.
LONG_PROMPT = " ".join(["cat"] * 80) + " purple sunset"


@pytest.fixture
def sink():
    """configure_logging into a buffer; the default stderr sink is put back afterwards."""
    buf = io.StringIO()
    yield buf
    logger.remove()
    logger.configure(extra={})
    logger.add(sys.stderr)


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_carry_the_job_id(tiny_flux_service, sink):
    configure_logging("json", "DEBUG", sink=sink)
    logger.info("before any job")
    out = tiny_flux_service.run({"prompt": "a cat", "seed": 1, **FAST}, "job-json-1")
    tiny_flux_service.run({"prompt": ""}, "job-json-2")
    records = [r["record"] for r in lines(sink)]
    assert records[0]["extra"]["job_id"] == "-" and records[0]["message"] == "before any job"
    ids = [r["extra"]["job_id"] for r in records[1:]]
    assert len(ids) >= 4 and set(ids) == {"job-json-1", "job-json-2"}
    assert "error" not in out
    failed = [r for r in records if r["extra"]["job_id"] == "job-json-2"]
    assert failed[-1]["level"]["name"] == "WARNING" and "prompt" in failed[-1]["message"]


def test_text_lines_carry_the_job_id(tiny_flux_service, sink):
    configure_logging("text", "INFO", sink=sink)
    tiny_flux_service.run({"prompt": "a cat", "seed": 1, **FAST}, "job-text-1")
    text = sink.getvalue().splitlines()
    assert text and all("[job-text-1]" in line for line in text)


def test_the_prompt_is_not_logged_at_info(tiny_flux_service, sink):
    import logging

    class Collect(logging.Handler):  # the libraries log through the standard logging module
        def emit(self, record):
            library.append(self.format(record))

    library: list[str] = []
    handler = Collect()
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).addHandler(handler)
    configure_logging("json", "INFO", sink=sink)
    try:
        out = tiny_flux_service.run({"prompt": LONG_PROMPT, "seed": 1, **FAST}, "job-private")
    finally:
        for name in ("diffusers", "transformers"):
            logging.getLogger(name).removeHandler(handler)
    assert "error" not in out
    everything = sink.getvalue() + "\n".join(library)
    assert "purple" not in everything and "cat cat" not in everything
    assert any(r["record"]["extra"]["job_id"] == "job-private" for r in lines(sink))
    # ...while at DEBUG it is there, for whoever asks for it locally.
    configure_logging("json", "DEBUG", sink=sink)
    tiny_flux_service.run({"prompt": LONG_PROMPT, "seed": 1, **FAST}, "job-debug")
    assert "purple sunset" in sink.getvalue()


def test_signatures_and_secrets_are_redacted(sink, s3_env, bucket):
    configure_logging("json", "DEBUG", secrets=secret_values(s3_env), sink=sink)
    url = open_store(f"s3://{bucket}/p").put("p/j/0.png", b"x", "image/png").url
    signature = url.split("X-Amz-Signature=")[1].split("&")[0]
    logger.info("stored at {}", url)
    try:
        raise RuntimeError(f"connect failed with key {AWS_ENV['AWS_SECRET_ACCESS_KEY']}")
    except RuntimeError:
        logger.exception("upload failed")
    text = sink.getvalue()
    assert "X-Amz-Signature=REDACTED" in text and strip_query(url) in text
    assert signature not in text
    assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in text and AWS_ENV["AWS_ACCESS_KEY_ID"] not in text
    assert "RuntimeError" in text  # the traceback is still there, minus the secret
    assert len(lines(sink)) == 2


def test_redact():
    assert redact("u?X-Amz-Credential=AKIA/x&X-Amz-Signature=abc123 z", []) == (
        "u?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED z")
    assert redact("token=hf_abc and s3cr3t", ["s3cr3t"]) == "token=REDACTED and REDACTED"
    assert strip_query("https://b.s3/k.png?X-Amz-Signature=abc") == "https://b.s3/k.png"


def test_a_run_prints_only_our_lines(tmp_path):
    """Library import notices (torchao's optional extensions, torch's _pytree deprecations, diffusers'
    "kept in float32: []") are silenced by configure_logging; every stderr line is one of ours."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")} | {"OUTPUT_URI": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "app", "run", '{"prompt": "a cat", "num_inference_steps": 1}'],
                          env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and all(" INFO " in line or " WARNING " in line for line in lines), lines
    assert not any(s in done.stderr for s in ("torchao", "_pytree", "float32: []"))
def test_redact_bearer_tokens_and_extra_secrets_in_every_form():
    assert redact("Authorization: Bearer abc.DEF-123_456/789=", []) == "Authorization: Bearer REDACTED"
    assert redact("missing or wrong bearer token", []) == "missing or wrong bearer token"  # words stay
    text = 'raw Tk+/x=9 json "Tk+/x=9" url Tk%2B%2Fx%3D9'
    assert redact(text, [], also=["Tk+/x=9"]) == 'raw REDACTED json "REDACTED" url REDACTED'


def test_the_stdio_scrubber_sees_a_secret_written_in_pieces():
    """print() and the RunPod SDK write a line in pieces; a secret split across them is still caught,
    a partial line is held through flush() and let out (scrubbed) when drained."""
    from app.logs import RedactingStream

    configure_logging("text", "INFO", ["s3cr3t-value"], sink=io.StringIO())
    try:
        out = io.StringIO()
        stream = RedactingStream(out)
        stream.write("INFO   | Job result: {'url': 'https://b/k?X-Amz-Security-Token=IQoJ")
        stream.write("b3JpZ2luX2VjE&X-Amz-Signature=abc123'} key s3cr3t-")
        stream.flush()
        assert out.getvalue() == ""  # held: the line has not ended
        stream.write("value\nprogress 10%\rprogress 20%\r")
        stream.write("tail without newline s3cr3t-val")
        text = out.getvalue()
        assert "IQoJ" not in text and "abc123" not in text and "s3cr3t" not in text
        assert "X-Amz-Security-Token=REDACTED" in text and "progress 20%\r" in text
        assert "tail" not in text
        stream.write("ue")
        stream.drain()
        assert out.getvalue().endswith("tail without newline REDACTED")
        assert stream.getvalue is not None  # everything else is the wrapped stream's
        long = RedactingStream(io.StringIO(), hold=100)
        long.write("x" * 150)
        assert long._stream.getvalue() == "x" * 150  # a line past `hold` is let out as it is
    finally:
        configure_logging("text", "DEBUG")
