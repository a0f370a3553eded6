"""Preflight: seconds-long checks of CUDA, driver, architecture, cuDNN, precision, torchao, VRAM,
disk and the output store, run before any weight is read (`python -m preflight`, or `run(inputs)`).

A library of plain arguments: it never imports the worker (`app`), which calls it with `Inputs`.
"""

from preflight.plan import Plan, PlanError, choose_precision, detect_plan
from preflight.report import Check, Report
from preflight.resources import Inputs
from preflight.runner import run

__all__ = ["Check", "Inputs", "Plan", "PlanError", "Report", "choose_precision", "detect_plan", "run"]
