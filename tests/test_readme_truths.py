"""What the README promises a user, checked against the code: the client's dependencies, the error
table's types, and the local ways to run the platforms' APIs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import app.errors

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# A backend that installs only what the README names (httpx, pydantic, loguru) must import the client.
BLOCKED = ("torch", "diffusers", "transformers", "fastapi", "starlette", "uvicorn", "runpod", "modal", "boto3",
           "botocore", "numpy", "PIL", "safetensors", "av")
IMPORT_WITHOUT = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked for the test: " + name)
sys.meta_path.insert(0, Refuse())
from app.client import ModalJobs, RemoteJobFailed, RunPodJobs, TransportError, WaitTimeout
print("imported")
"""


def test_the_client_needs_only_httpx_pydantic_and_loguru():
    assert "`httpx`, `pydantic` and `loguru`" in README
    done = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]


def _error_table_types() -> set[str]:
    section = README.split("## The job contract", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))


def test_every_error_type_the_worker_reports_is_in_the_readme_table():
    ours = {c.type for c in vars(app.errors).values() if isinstance(c, type) and issubclass(c, app.errors.WorkerError)
            and c is not app.errors.WorkerError}
    platform = {"worker_failed": "modal_app.py", "worker_exception": "app/jobs.py"}  # Modal's crash; RunPod's
    for kind, where in platform.items():
        assert f'"type": "{kind}"' in (ROOT / where).read_text(), (kind, where)
    assert ours and (ours | set(platform)) <= _error_table_types(), (ours | set(platform)) - _error_table_types()


def test_the_local_ways_to_run_are_documented():
    for command in ("--test_input", "--rp_serve_api", "python -m app serve"):
        assert command in README, command
    assert (ROOT / "docs" / "deploy.md").read_text().count("python -m app serve") >= 1
