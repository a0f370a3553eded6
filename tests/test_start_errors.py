"""A worker that cannot start says why in one line naming the variable, never with a traceback
(the traceback goes to the log at DEBUG), on each entrypoint: `python -m app run`, `handler.py`
(RunPod's local test mode) and Modal's enter (`Worker().run.local`, the real class).

Each bad setting fails at a different point: JOB_TIMEOUT_S=abc while the settings are read,
OUTPUT_URI=file://host/x when the store is opened, SHAPES=0x0 against the family's limits. The
processes run at once (each imports torch: seconds), before any assertion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BAD = {"JOB_TIMEOUT_S": "abc", "OUTPUT_URI": "file://host/x", "SHAPES": "0x0"}
MODAL_RUN = "import modal_app, json; print('RESULT ' + json.dumps(modal_app.Worker().run.local({'prompt': 'a'})))"
COMMANDS = {
    "app": [sys.executable, "-m", "app", "run", '{"prompt": "a"}'],
    "handler": [sys.executable, "handler.py", "--test_input", '{"input": {"prompt": "a"}}'],
    "modal": [sys.executable, "-c", MODAL_RUN],
}
# `python -m app run` with SHAPES (and PRECISION, MODEL) is tests/test_config.py's; JOB_TIMEOUT_S fails before logging is set up.
CASES = [(entry, var) for entry in COMMANDS for var in BAD if entry != "app" or var == "JOB_TIMEOUT_S"]


def _run(case: tuple[str, str]) -> subprocess.CompletedProcess:
    entry, var = case
    env = {k: v for k, v in os.environ.items() if k not in BAD and not k.startswith(("RUNPOD_", "MODEL"))}
    env.update({"MODEL": "tiny-flux", "DEVICE": "cpu", "PREFLIGHT": "0", "WARMUP": "0",
                "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "OUTPUT_URI": str(ROOT / "nothing-written"), var: BAD[var]})
    return subprocess.run(COMMANDS[entry], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def runs() -> dict:
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(CASES, pool.map(_run, CASES)))


@pytest.mark.parametrize("entry, var", CASES)
def test_a_bad_setting_is_one_line_naming_it(runs, entry, var):
    done = runs[(entry, var)]
    text = done.stdout + done.stderr
    assert "Traceback" not in text, text[-3000:]
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("worker did not start: ")]
    assert var in line, line
    if entry == "app":
        assert done.returncode == 2
    elif entry == "handler":  # the SDK's local mode reports the job FAILED with our typed error
        (failed,) = [ln for ln in text.splitlines() if "failed with error:" in ln]
        error = json.loads(failed.split("failed with error: ", 1)[1])
        assert error["type"] == "worker_broken" and error["field"] == var
    else:  # Modal: the call answers the typed error instead of the enter raising
        (result,) = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        error = json.loads(result[len("RESULT "):])["error"]
        assert error["type"] == "worker_broken" and error["field"] == var
