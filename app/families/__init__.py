"""The model families the worker serves, one module each; this registry finds them.

Every module of this package other than `base` defines `FAMILY` (or a tuple of them, one per pipeline
class it serves): adding a family is adding its module (its pipeline call, defaults, limits, skip
list, tiny build), nothing else here.
"""

from __future__ import annotations

import importlib
import pkgutil

from app.errors import WorkerBroken
from app.families.base import Defaults, Family

_NOT_FAMILIES = {"base"}


def _discover() -> dict[str, Family]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _NOT_FAMILIES or info.name.startswith("_"):
            continue
        fams = importlib.import_module(f"{__name__}.{info.name}").FAMILY
        for fam in fams if isinstance(fams, tuple) else (fams,):
            found[fam.name] = fam
    return found


FAMILIES: dict[str, Family] = _discover()
TINY_PREFIX = "tiny-"  # MODEL=tiny-<family>: the family's embedded tiny random model


def family_for_pipeline_class(class_name: str) -> Family:
    """The family serving a diffusers pipeline class name (from model_index.json or a manifest)."""
    for fam in FAMILIES.values():
        if class_name == fam.pipeline_class:
            return fam
    known = ", ".join(sorted(f.pipeline_class for f in FAMILIES.values()))
    raise WorkerBroken(f"unsupported pipeline class {class_name!r} (supported: {known})", field="MODEL")


def family_named(name: str, field: str = "MODEL") -> Family:
    """The family called `name`; WorkerBroken naming `field` when there is none."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise WorkerBroken(f"unknown model family {name!r} (known: {', '.join(sorted(FAMILIES))})",
                           field=field) from None


def family_for_tiny(model: str) -> Family | None:
    """`tiny-flux` -> the flux family (to build its tiny model), `tiny-wan-i2v-a14b` -> wan-i2v (a family's
    `tiny_models`), anything not `tiny-*` -> None."""
    found = _embedded(model)
    return found[0] if found else None


def tiny_family(model: str) -> Family | None:
    """The tiny variant MODEL=`model` serves (and builds), or None when it is not `tiny-*`."""
    found = _embedded(model)
    if not found:
        return None
    fam, variant = found
    return fam.tiny_variant(variant) if variant else fam.tiny_variant()


def _embedded(model: str) -> tuple[Family, str] | None:
    if not model.startswith(TINY_PREFIX):
        return None
    name = model.removeprefix(TINY_PREFIX)
    embedded = {fam.name: (fam, "") for fam in FAMILIES.values()}
    embedded.update({f"{fam.name}-{m}": (fam, m) for fam in FAMILIES.values() for m in fam.tiny_models})
    if name not in embedded:
        names = ", ".join(TINY_PREFIX + n for n in sorted(embedded))
        raise WorkerBroken(f"unknown embedded model {model!r} (use {names})", field="MODEL")
    return embedded[name]


__all__ = ["Defaults", "Family", "FAMILIES", "family_for_pipeline_class", "family_for_tiny",
           "tiny_family",
           "family_named"]
