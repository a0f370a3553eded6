"""GPU checks: torch imports, a CUDA device is visible, the driver is new enough, the card's
architecture has kernels in this torch build, and cuDNN loads. Each runs a real kernel where a list
could lie (a build can name an arch and still fail to launch on it).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from preflight.report import Check, fail, first_line, ok, warn

GIB = 1024**3
_LIBRARY = re.compile(r"(lib[A-Za-z0-9_+\-]+\.so(?:\.\d+)*)")
_LIBRARY_FIX = {
    "libcudnn": "install cuDNN 9 (the nvidia-cudnn wheel torch depends on, or a cudnn base image)",
    "libcuda.so": "the container sees no NVIDIA driver: run it with the NVIDIA container runtime (--gpus all)",
    "libnvidia-ml": "the container sees no NVIDIA driver: run it with the NVIDIA container runtime (--gpus all)",
}
# The oldest Linux driver for each CUDA runtime (NVIDIA's CUDA release notes, table 3).
MIN_DRIVER = {(12, 0): "525.60", (12, 4): "550.54", (12, 6): "560.28", (12, 8): "570.26", (12, 9): "575.51",
              (13, 0): "580.65"}


@dataclass(frozen=True)
class GpuFacts:
    """What torch sees of device 0; gathered once by `check_cuda`, read by the later checks."""

    name: str
    capability: tuple[int, int]
    count: int
    arch_list: tuple[str, ...]
    free_bytes: int = 0
    total_bytes: int = 0

    @property
    def sm(self) -> str:
        """'sm_90' for capability (9, 0)."""
        return f"sm_{self.capability[0]}{self.capability[1]}"


def missing_library(message: str) -> str | None:
    """The shared library an import error names (`libcudnn.so.9`), if any."""
    m = _LIBRARY.search(message)
    return m.group(1) if m else None


def check_torch():
    """(check, torch module or None): torch imports; a missing CUDA library is named with its fix."""
    try:
        import torch
    except (ImportError, OSError) as e:
        lib = missing_library(str(e))
        if lib is None:
            return fail("torch", f"torch does not import: {type(e).__name__}: {first_line(e)}"), None
        fix = next((f for prefix, f in _LIBRARY_FIX.items() if lib.startswith(prefix)),
                   "install the CUDA libraries this torch build expects (see requirements/gpu.txt)")
        return fail("torch", f"torch does not import: {lib} not found: {fix}", missing_library=lib), None
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    return ok("torch", f"torch {torch.__version__}, {build}", torch=torch.__version__,
              cuda_runtime=torch.version.cuda), torch


def check_cuda(torch):
    """(check, GpuFacts or None): a CUDA device is visible; its name, capability and memory."""
    if torch.version.cuda is None:
        return fail("cuda", f"torch {torch.__version__} is a CPU-only build: install the CUDA build "
                            "(requirements/gpu.txt), or run with --cpu / DEVICE=cpu"), None
    # torch turns a driver/runtime mismatch into a warning and is_available() == False; keep its words.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        why = first_line(seen[0].message) if seen else "no device visible (CUDA_VISIBLE_DEVICES, --gpus?)"
        return fail("cuda", f"no usable CUDA device: {why}"), None
    cap = tuple(torch.cuda.get_device_capability(0))
    free, total = torch.cuda.mem_get_info(0)  # also creates the context every later check needs
    free = usable_bytes(torch, free, total)
    gpu = GpuFacts(torch.cuda.get_device_name(0), cap, torch.cuda.device_count(),
                   tuple(torch.cuda.get_arch_list()), free, total)
    return ok("cuda", f"{gpu.count} device(s); {gpu.name}, capability {cap[0]}.{cap[1]}, "
                      f"{total / GIB:.1f} GiB", name=gpu.name, count=gpu.count, capability=f"{cap[0]}.{cap[1]}",
              memory_total_gib=round(total / GIB, 2), memory_free_gib=round(free / GIB, 2),
              arch_list=list(gpu.arch_list)), gpu


def usable_bytes(torch, free: int, total: int) -> int:
    """Free bytes this process may still allocate: the device's free memory, or less under a
    `torch.cuda.set_per_process_memory_fraction` cap (how a smaller card is simulated on a large one)."""
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    f = fraction(0) if fraction else 1.0
    if f >= 1.0:
        return free
    return max(0, min(free, int(f * total) - torch.cuda.memory_reserved(0)))


def _version(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor.split(".")[0] or 0)


def _nvml_versions() -> tuple[str, tuple[int, int]]:
    """(driver version, highest CUDA it supports) as NVML reports them."""
    import pynvml

    pynvml.nvmlInit()
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()  # 12080 for CUDA 12.8
    finally:
        pynvml.nvmlShutdown()
    driver = driver.decode() if isinstance(driver, bytes) else str(driver)
    return driver, (cuda // 1000, cuda % 1000 // 10)


def check_driver(runtime: str | None) -> Check:
    """NVML's driver version and the highest CUDA it supports vs the CUDA runtime torch was built with."""
    try:
        import pynvml
    except ImportError:
        return warn("driver", "nvidia-ml-py is not installed: cannot read the driver (pip install nvidia-ml-py)")
    try:
        driver, supports = _nvml_versions()
    except pynvml.NVMLError as e:
        return fail("driver", f"NVML does not answer ({e}): the container sees no NVIDIA driver")
    facts = dict(driver=driver, cuda_driver=f"{supports[0]}.{supports[1]}")
    if runtime is None:
        return warn("driver", f"driver {driver} (CUDA {supports[0]}.{supports[1]}); torch has no CUDA runtime", **facts)
    need = _version(runtime)
    if supports < need:
        floor = MIN_DRIVER.get(need)
        hint = f" (CUDA {runtime} needs driver >= {floor})" if floor else ""
        return fail("driver", f"driver {driver} supports CUDA up to {supports[0]}.{supports[1]} but torch is built "
                              f"for CUDA {runtime}{hint}: pick a host with a newer driver, or an image built for "
                              f"CUDA <= {supports[0]}.{supports[1]}", **facts)
    return ok("driver", f"driver {driver} supports CUDA {supports[0]}.{supports[1]} >= runtime {runtime}", **facts)


def _arch_number(entry: str) -> int:
    """'sm_90a' -> 90, 'compute_120' -> 120, 'sm_100f' -> 100 (torch's _extract_arch_version)."""
    return int(entry.split("_", 1)[1].removesuffix("a").removesuffix("f"))


def arch_served(capability: tuple[int, int], arch_list) -> str | None:
    """The arch-list entry whose code runs on `capability`, or None.

    Mirrors torch's own rule (torch.cuda._check_capability): code for sm_XY runs on same-major
    cards of minor >= Y (sm_80 code runs on an sm_86 card; nothing crosses a major version, so an
    sm_120 card needs sm_120 in the list). Jetson-only exceptions do not apply to server cards.
    """
    major, minor = capability
    for entry in arch_list:
        code = _arch_number(entry)
        if code // 10 == major and code % 10 <= minor:
            return entry
    return None


def check_arch(gpu: GpuFacts) -> Check:
    """The card's architecture is in torch's arch list, and a bf16 matmul really runs on it."""
    served = arch_served(gpu.capability, gpu.arch_list)
    if served is None:
        return fail("arch", f"{gpu.name} is {gpu.sm} but this torch has kernels for {' '.join(gpu.arch_list)} "
                            f"only (no kernel image): install a torch build whose arch list includes {gpu.sm} "
                            "(CUDA 12.8+ builds for sm_100/sm_120; see requirements/gpu.txt)")
    import torch

    try:
        a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        finite = bool(torch.isfinite(a @ a).all())  # .item() synchronizes: the kernel really ran
    except RuntimeError as e:
        return fail("arch", f"a bf16 matmul fails on {gpu.sm}: {first_line(e)}")
    if not finite:
        return fail("arch", f"a bf16 matmul on {gpu.sm} returned non-finite values")
    return ok("arch", f"{gpu.sm} served by {served}; a bf16 matmul ran")


def _cudnn_version(v: int) -> str:
    # cuDNN 9 encodes major*10000 + minor*100 + patch; cuDNN 8 used major*1000 + minor*100 + patch.
    base = 10000 if v >= 10000 else 1000
    return f"{v // base}.{v % base // 100}.{v % 100}"


def check_cudnn() -> Check:
    """cuDNN loads (its version) and one bf16 convolution really runs through it."""
    import torch

    try:
        version = torch.backends.cudnn.version()
        if version is None or not torch.backends.cudnn.is_available():
            return fail("cudnn", "cuDNN is not available to torch: install cuDNN 9 (see requirements/gpu.txt)")
        x = torch.randn(1, 8, 32, 32, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(8, 8, 3, 3, device="cuda", dtype=torch.bfloat16)
        with torch.backends.cudnn.flags(enabled=True):
            finite = bool(torch.isfinite(torch.nn.functional.conv2d(x, w, padding=1)).all())
    except (RuntimeError, OSError) as e:
        lib = missing_library(str(e))
        return fail("cudnn", f"{lib} not found: install cuDNN 9" if lib else f"a convolution fails: {first_line(e)}")
    if not finite:
        return fail("cudnn", "a cuDNN convolution returned non-finite values")
    return ok("cudnn", f"cuDNN {_cudnn_version(version)}; a bf16 convolution ran", cudnn=_cudnn_version(version))
