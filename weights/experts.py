"""Which denoiser a file on the command line is for: `--fuse-lora high=FILE`, `weights import low=FILE`.

A family with several denoisers names them by expert keys (`experts`: key -> pipeline attribute; Wan 2.2
A14B: `high` -> `transformer`, the high-noise steps, `low` -> `transformer_2`). A bare FILE is the main
denoiser's: the one form a single-denoiser model takes, refused where the model has several (which
expert it is for would be a guess). A `KEY=` prefix is a word of letters, digits, `-` and `_`; a file
whose own name looks like one is given as `./name`.
"""

from __future__ import annotations

import re
from typing import Protocol

from weights.errors import UnknownExpert

_KEYED = re.compile(r"([A-Za-z][A-Za-z0-9_-]*)=(.+)")


class ExpertSpec(Protocol):
    """What the assignment needs of a model family (app.families.Family provides it)."""

    name: str
    denoiser: str
    experts: tuple[tuple[str, str], ...]


def split(spec: str) -> tuple[str | None, str]:
    """(expert key or None, file) of one `[KEY=]FILE` argument."""
    m = _KEYED.fullmatch(spec)
    return (m.group(1), m.group(2)) if m else (None, spec)


def key_of(family: ExpertSpec, attr: str) -> str | None:
    """The expert key naming pipeline attribute `attr` (None: the family names none)."""
    return next((k for k, a in getattr(family, "experts", ()) if a == attr), None)


def assign(specs, family: ExpertSpec, present, flag: str) -> dict[str, tuple[str | None, str]]:
    """{pipeline attribute: (expert key or None, file)} for `[KEY=]FILE` arguments, in the model's
    denoiser order. `present`: the denoisers this model holds. UnknownExpert naming the key (or the
    file) for a key the family lacks, an expert the model lacks, a bare file where the model holds
    several denoisers, or two files for one denoiser."""
    experts = dict(getattr(family, "experts", ()))
    present = list(present)
    names = ", ".join(k for k, a in experts.items() if a in present) or "none"
    out: dict[str, tuple[str | None, str]] = {}
    for spec in [specs] if isinstance(specs, str) else specs:
        key, path = split(spec)
        if key is None:
            if len(present) > 1:
                raise UnknownExpert(
                    f"{flag} {path}: this {family.name} model holds {len(present)} denoisers "
                    f"({', '.join(present)}); name the expert each file is for: "
                    + " ".join(f"{flag} {k}=FILE" for k, a in experts.items() if a in present))
            attr = family.denoiser
        elif key not in experts:
            has = f"its experts: {', '.join(experts)}" if experts else f"one denoiser: give {flag} FILE"
            raise UnknownExpert(f"{flag} {key}={path}: the {family.name} family has no expert {key!r} ({has})")
        else:
            attr = experts[key]
            if attr not in present:
                raise UnknownExpert(f"{flag} {key}={path}: this {family.name} model has no {attr} (expert "
                                    f"{key!r}); its experts: {names}")
        if attr in out:
            raise UnknownExpert(f"{flag} {spec}: a second file for {attr} (the first: {out[attr][1]})")
        out[attr] = (key, path)
    return {a: out[a] for a in present if a in out}
