"""Preflight: seconds-long checks of CUDA, driver, architecture, cuDNN, precision, torchao, VRAM,
disk and the output store, run before any weight is read (`python -m preflight`, or `run(settings)`).
"""

from preflight.report import Check, Report
from preflight.runner import run

__all__ = ["Check", "Report", "run"]
