"""The execution plan: which device and precision this worker runs with, decided by the GPU.

FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell); INT8 tensor-core matmuls are the
best Ampere (8.0/8.6) can do; older cards and the CPU run bf16/fp32. `PRECISION` may force a plan,
and a plan the card cannot run is refused loudly instead of silently falling back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


class PlanError(ValueError):
    """A forced plan this machine cannot run; `field` names the setting (PRECISION)."""

    def __init__(self, message: str, field: str = "PRECISION"):
        super().__init__(message)
        self.message, self.field = message, field


@dataclass(frozen=True)
class Plan:
    device: str  # "cuda" | "cpu"
    precision: str  # "fp8" | "int8" | "bf16" | "fp32"
    capability: tuple[int, int] | None = None
    gpu_name: str = "cpu"
    fp4_available: bool = False
    memory: str = "resident"  # the memory plan (preflight.memory): resident | offload-text | offload-blocks
    vae_tiling: bool = False
    text_encoders: str = "bf16"  # bf16 | fp8 (TEXT_ENCODERS)

    @property
    def torch_dtype(self):
        import torch

        return torch.float32 if self.device == "cpu" else torch.bfloat16

    def to_dict(self) -> dict:
        return asdict(self)


def best_precision(capability: tuple[int, int] | None, fp8_works: bool = True) -> str:
    """The fastest precision a capability supports (the `auto` plan)."""
    if capability is None:
        return "fp32"
    if capability >= (8, 9) and fp8_works:
        return "fp8"
    if capability >= (8, 0):
        return "int8"
    return "bf16"


def choose_precision(requested: str, capability: tuple[int, int] | None, fp8_works: bool = True) -> str:
    """Resolve `PRECISION` (auto|fp8|int8|bf16) against the card; raise PlanError if it cannot run it."""
    auto = best_precision(capability, fp8_works)
    if requested == "auto":
        return auto
    if capability is None:  # CPU: quantized kernels are a GPU matter; run the reference path
        if requested in ("fp8", "int8"):
            raise PlanError(f"PRECISION={requested} needs a GPU; this worker has none")
        return "fp32"
    cap = f"sm_{capability[0]}{capability[1]}"
    if requested == "fp8" and auto != "fp8":
        why = "the FP8 smoke test failed" if capability >= (8, 9) else "FP8 needs compute capability 8.9 or newer"
        raise PlanError(f"PRECISION=fp8 cannot run on {cap}: {why}")
    if requested == "int8" and capability < (8, 0):
        raise PlanError(f"PRECISION=int8 cannot run on {cap}: needs 8.0 or newer")
    return requested


def detect_plan(requested_precision: str = "auto", device: str = "auto") -> Plan:
    """A plan from what torch sees, without the full preflight (used when preflight is off)."""
    import torch

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return Plan("cpu", choose_precision(requested_precision, None))
    cap = torch.cuda.get_device_capability(0)
    return Plan("cuda", choose_precision(requested_precision, cap), cap, torch.cuda.get_device_name(0), cap >= (10, 0))
