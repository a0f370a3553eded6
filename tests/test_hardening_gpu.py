"""GPU faults end in a clean FAILED job or a replaced worker, never a crash loop.

Out-of-memory and a poisoned CUDA context come from the GPU, which this machine does not have:
the tests raise the very exceptions torch raises there (torch.cuda.OutOfMemoryError,
torch.AcceleratorError / "CUDA error: ..." RuntimeError) from a forward pre-hook on the real tiny
denoiser, mid-pipeline, where the GPU would. Everything around it (pipeline, Service, RunPod's own
job runner) is real. The H100 side (real OOM, VRAM flat over 50 jobs) is bench/soak.py.
"""

from __future__ import annotations

import asyncio
import json
import importlib.util
import weakref
from pathlib import Path

import pytest
import torch

from tests.hardening_helpers import one_torch_thread, service_like, tiny_job  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


class Fault:
    """A pre-hook on the denoiser that raises `exc` on the listed forward calls (1-based) and counts calls."""

    def __init__(self, module, exc_factory, on_calls=(1,)):
        self.calls, self.on_calls, self.exc_factory = 0, set(on_calls), exc_factory
        self.pinned: weakref.ref | None = None
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls in self.on_calls:
            activations = torch.empty(1 << 20)  # what a real failed forward leaves pinned by its traceback
            self.pinned = weakref.ref(activations)
            raise self.exc_factory()

    def remove(self):
        self.handle.remove()


@pytest.fixture
def fault(tiny_flux_service):
    hooks = []

    def make(exc_factory, on_calls=(1,)):
        hooks.append(Fault(tiny_flux_service.pipe.transformer, exc_factory, on_calls))
        return hooks[-1]

    yield make
    for h in hooks:
        h.remove()


def test_oom_fails_the_job_frees_memory_and_the_next_job_succeeds(tiny_flux_service, fault, monkeypatch,
                                                                   one_torch_thread):
    service = service_like(tiny_flux_service)
    oom = fault(lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB"))
    # The allocator's cache is a GPU thing: record, at the moment it is emptied, whether the failed
    # forward's tensors were already unreachable (they are not while the OOM traceback lives).
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(oom.pinned() is None))

    out = service.run(tiny_job(1, num_images=2), "oom-1")
    assert out["error"]["type"] == "out_of_memory"
    assert out["error"]["message"] == "out of GPU memory at 256x256 x2; try fewer images or a smaller size"
    assert emptied == [True], "empty_cache ran while the failed forward's tensors were still alive"
    assert not service.broken

    after = service.run(tiny_job(2), "oom-2")
    assert "images" in after and oom.calls == 2


@pytest.mark.parametrize("make_error", [
    lambda: RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                         "asynchronously reported at some other API call"),
    lambda: torch.AcceleratorError("CUDA error: unspecified launch failure"),
    lambda: RuntimeError("CUDA error: device-side assert triggered"),
    lambda: RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
], ids=["illegal-access", "accelerator-error", "device-assert", "cudnn"])
def test_poisoned_cuda_breaks_the_worker_for_good(tiny_flux_service, fault, make_error):
    service = service_like(tiny_flux_service)
    poison = fault(make_error)
    out = service.run(tiny_job(1), "poison-1")
    assert out["error"]["type"] == "worker_broken" and out["error"]["message"].startswith("CUDA error, worker must")
    assert "\n" not in out["error"]["message"] and "Traceback" not in out["error"]["message"]
    assert service.broken
    poison.remove()
    for i in range(3):  # stays broken: no job touches the context again (Modal's container exits on this flag)
        again = service.run(tiny_job(i), f"poison-after-{i}")
        assert again["error"]["type"] == "worker_broken" and service.broken
    assert poison.calls == 1


def test_an_ordinary_runtime_error_fails_the_job_only(tiny_flux_service, fault, one_torch_thread):
    service = service_like(tiny_flux_service)
    fault(lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied (64x32 and 16x32)"))
    out = service.run(tiny_job(1), "bug-1")
    assert out["error"] == {"type": "job_failed", "message": "internal error while running the job"}
    assert not service.broken and "images" in service.run(tiny_job(2), "bug-2")


def test_job_timeout_stops_at_the_next_step(tiny_flux_service, fault):
    service = service_like(tiny_flux_service, job_timeout_s=0.001)
    counter = fault(lambda: None, on_calls=())
    steps = []
    out = service.run(tiny_job(1, num_inference_steps=4), "slow-1", progress=lambda s, t: steps.append(s))
    assert out["error"]["type"] == "timeout"
    assert out["error"]["message"] == "job exceeded JOB_TIMEOUT_S=0.001 at step 1/4"
    assert counter.calls == 1 and steps == [1]  # one denoising step ran, not four
    assert not service.broken


@pytest.fixture
def runpod_handler(tmp_path, monkeypatch):
    """handler.py imported as RunPod imports it (its own Service, loaded from the environment)."""
    for k, v in dict(MODEL="tiny-flux", PREFLIGHT="false", WARMUP="false", DEVICE="cpu",
                     OUTPUT_URI=str(tmp_path)).items():
        monkeypatch.setenv(k, v)
    spec = importlib.util.spec_from_file_location("handler_under_test", ROOT / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a separate module object: `import handler` elsewhere is untouched
    return module


def test_runpod_handler_asks_for_a_new_worker_when_broken(runpod_handler):
    from runpod.serverless.modules.rp_job import run_job

    service = runpod_handler.service
    oom = Fault(service.pipe.transformer, lambda: torch.cuda.OutOfMemoryError("CUDA out of memory"))
    first = asyncio.run(run_job(runpod_handler.handler, {"id": "rp-1", "input": tiny_job(1)}))
    # RunPod's contract: `error` is a string (our typed error as JSON)
    assert json.loads(first["error"])["type"] == "out_of_memory" and "stopPod" not in first  # OOM: the worker stays
    oom.remove()

    Fault(service.pipe.transformer, lambda: RuntimeError("CUDA error: an illegal memory access was encountered"))
    broken = asyncio.run(run_job(runpod_handler.handler, {"id": "rp-2", "input": tiny_job(2)}))
    assert json.loads(broken["error"])["type"] == "worker_broken"
    assert broken.get("stopPod") is True  # RunPod's runner turned our refresh_worker into a worker refresh


@pytest.mark.parametrize("make_error", [
    lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    lambda: torch.AcceleratorError("CUDA error: out of memory"),
], ids=["cublas-alloc", "launch-oom"])
def test_library_reported_oom_is_an_oom_not_a_broken_worker(tiny_flux_service, fault, make_error, one_torch_thread):
    service = service_like(tiny_flux_service)
    fault(make_error)
    assert service.run(tiny_job(1), "liboom-1")["error"]["type"] == "out_of_memory"
    assert not service.broken and "images" in service.run(tiny_job(2), "liboom-2")
