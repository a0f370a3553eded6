"""Fingerprints of the upstream (diffusers) code this worker copies or writes into.

`app.fused` runs copies of two diffusers forwards and `app.attention` writes an entry into diffusers'
private attention registry. Each records the sha256 of the upstream source it was written against;
`changed` names what no longer matches, so the runtime falls back to the stock path (a changed forward
must not be replaced by a copy of the old one) and tests/test_upstream.py fails on a diffusers upgrade
with the name of what to re-copy.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect


def resolve(qualname: str):
    """The object named `qualname` (`package.module.Class.method`): the longest importable module prefix,
    then attributes."""
    parts = qualname.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(qualname)


def fingerprint(qualname: str) -> str:
    """The first 16 hex digits of the sha256 of the object's source."""
    return hashlib.sha256(inspect.getsource(resolve(qualname)).encode()).hexdigest()[:16]


def changed(copies: dict[str, str]) -> list[str]:
    """The names in `copies` ({qualname: fingerprint}) whose upstream source differs or is gone."""
    out = []
    for name, expected in copies.items():
        try:
            if fingerprint(name) != expected:
                out.append(name)
        except (ImportError, AttributeError, OSError, TypeError):
            out.append(name)
    return out
