"""How a job's CUDA failure is told apart: an allocation failure (the job fails, memory is given back) or a
sticky CUDA error (the context cannot be trusted: the worker must be replaced)."""

from __future__ import annotations


def release_cuda_memory() -> None:
    """Return the caching allocator's free blocks after an OOM, so the next job starts clean."""
    import gc

    import torch

    gc.collect()  # the failed forward's activations may sit in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Messages after which the CUDA context cannot be trusted: a sticky error makes every later kernel
# launch fail (or worse, compute garbage), so the process must go, not the job only.
POISON_MARKERS = ("CUDA error", "CUDA driver error", "device-side assert", "illegal memory access",
                  "unspecified launch failure", "CUBLAS_STATUS", "cuDNN error", "CUDNN_STATUS", "ECC error")


# Allocation failures that arrive as plain RuntimeErrors: not sticky, the context survives them.
OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def allocation_failed(e: RuntimeError) -> bool:
    """An allocation failure a library reported as a RuntimeError: the job fails, the worker survives."""
    return any(s in str(e) for s in OOM_MARKERS)


def poisoned(e: RuntimeError) -> bool:
    """An error after which the CUDA context cannot be trusted (the process must go)."""
    import torch

    if isinstance(e, getattr(torch, "AcceleratorError", ())):  # torch >= 2.8 raises this for CUDA errors
        return True
    text = str(e)
    return any(s in text for s in POISON_MARKERS)
