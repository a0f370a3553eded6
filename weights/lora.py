"""Fuse a LoRA into a pipeline before it is baked: `python -m weights bake ... --fuse-lora FILE`.

The few-step LoRAs (Qwen-Image-Edit Lightning: 4 or 8 steps at CFG 1) are what make editing cheap;
fused into the denoiser's weights before quantization, the baked model runs them at no extra cost
per step and needs no LoRA at load. Loading, fusing and unloading are diffusers' own
(`load_lora_weights`, `fuse_lora(lora_scale=S)`, `unload_lora_weights`), so every LoRA format diffusers
reads (peft/diffusers keys, Kohya, the Lightning files) works the same here as in diffusers. A LoRA
with layers that match no module of the model is refused naming the file: diffusers only warns, and
a bake that silently dropped the LoRA would serve the wrong model.

A model with several denoisers takes one LoRA per expert (`--fuse-lora high=FILE --fuse-lora low=FILE`,
the keys `weights.experts` resolves: Wan 2.2 A14B's distillation LoRAs come as a high-noise and a
low-noise file), each fused into its own transformer and checked to have landed there and nowhere else.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from weights import experts
from weights.errors import UnknownExpert, UnknownFormat, WeightsError

ADAPTER = "bake"
# one tensor per adapted layer, whatever the format: peft/diffusers lora_A, Kohya lora_down
_DOWN = re.compile(r"(^|\.)(lora_A|lora_down|lora\.down)(\.[^.]+)?\.weight$")


def add_arguments(bake_parser) -> None:
    """`python -m weights bake`'s LoRA and defaults flags."""
    bake_parser.add_argument("--fuse-lora", metavar="[EXPERT=]FILE", action="append",
                             help="fuse this LoRA (safetensors) before quantizing; a model with several "
                                  "denoisers takes one per expert, repeated: --fuse-lora high=FILE "
                                  "--fuse-lora low=FILE (Wan 2.2 A14B)")
    bake_parser.add_argument("--lora-scale", metavar="[EXPERT=]S", action="append",
                             help="its weight (default 1); EXPERT=S for one expert's LoRA, repeated")
    bake_parser.add_argument("--steps", type=_bounded(int, 1, 100), metavar="N",
                             help="the baked model's default steps (a Lightning LoRA: 4 or 8)")
    bake_parser.add_argument("--guidance", type=_bounded(float, 0, 30), metavar="G",
                             help="the baked model's default guidance (a Lightning LoRA: 1, no CFG)")


def options(args) -> dict:
    """bake_extra's keyword arguments from the parsed flags."""
    return dict(lora=args.fuse_lora, lora_scale=args.lora_scale, steps=args.steps, guidance=args.guidance)


def bake_extra(pipe, family=None, lora=None, lora_scale=1.0, steps: int | None = None,
               guidance: float | None = None) -> dict:
    """Fuse `lora` (one `[EXPERT=]FILE` or a list) into `pipe`'s denoisers (in place); return what the
    manifest records: {"lora": ...} for a bare file (the main denoiser's), {"lora_by_expert": {key:
    ...}} for per-expert files, and {"defaults": {"steps", "guidance"}} (the worker's defaults for that
    bake), each only when given. `family` (its denoiser, extra_denoisers, experts) resolves the keys."""
    extra: dict = {}
    if lora:
        family = family or _Main()
        present = [n for n in (family.denoiser, *getattr(family, "extra_denoisers", ()))
                   if getattr(pipe, n, None) is not None]
        chosen = experts.assign(lora, family, present, "--fuse-lora")
        scales = _scales(lora_scale, {k for k, _ in chosen.values() if k})
        for attr, (key, path) in chosen.items():
            record = fuse_lora(pipe, path, scales.get(key, scales[None]), attr, family.denoiser)
            if key is None:
                extra["lora"] = record
            else:
                extra.setdefault("lora_by_expert", {})[key] = {**record, "denoiser": attr}
    defaults = {k: v for k, v in (("steps", steps), ("guidance", guidance)) if v is not None}
    if defaults:
        extra["defaults"] = defaults
    return extra


class _Main:
    """A model with one denoiser, `transformer` (callers without a family: the one-file form)."""

    name, denoiser, experts = "this", "transformer", ()


def _scales(given, keys: set[str]) -> dict:
    """{expert key or None (every LoRA's): scale} from `--lora-scale [EXPERT=]S` values (or one number)."""
    out: dict = {None: 1.0}
    for spec in [given] if isinstance(given, (int, float, str)) else (given or ()):
        key, text = experts.split(str(spec))
        if key is not None and key not in keys:
            raise UnknownExpert(f"--lora-scale {spec}: no --fuse-lora {key}=FILE was given "
                                f"(LoRAs given for: {', '.join(sorted(keys)) or 'no expert'})")
        try:
            out[key] = float(text)
        except ValueError:
            raise WeightsError(f"--lora-scale {spec}: {text!r} is not a number") from None
    return out


def _bounded(kind, lo, hi):
    """An argparse type: `kind` within [lo, hi], the job contract's bounds (a baked default outside
    them would make every job that sets nothing fail)."""
    import argparse

    def parse(text: str):
        v = kind(text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is not between {lo} and {hi}")
        return v

    return parse


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()


def fuse_lora(pipe, path: str | Path, scale: float = 1.0, denoiser: str = "transformer",
              main: str = "transformer") -> dict:
    """Fuse the LoRA at `path` (safetensors) into `pipe`'s `denoiser` at `scale`, in place; return its
    manifest record {"file", "sha256", "scale", "layers"}. A denoiser other than the `main` one is loaded
    with diffusers' `load_into_<name>` (Wan's `load_into_transformer_2`). WeightsError naming the file
    when it cannot be read, or when any of its layers matches no module of that denoiser."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--fuse-lora {path}: no such file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UnknownFormat(f"--fuse-lora {path.name}: not a readable safetensors file ({e})") from None
    wanted = sum(1 for k in state if _DOWN.search(k))
    if not wanted:
        raise UnknownFormat(f"--fuse-lora {path.name}: no LoRA tensors (lora_A / lora_down weights) in it")
    into = {} if denoiser == main else {f"load_into_{denoiser}": True}
    try:
        pipe.load_lora_weights(state, adapter_name=ADAPTER, **into)
    except (ValueError, KeyError, RuntimeError, AttributeError) as e:  # peft: "Target modules ... not found"
        _unload(pipe)
        detail = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        what = "targets no layer of" if "not found in the base model" in detail else "does not fit"
        raise WeightsError(f"--fuse-lora {path.name}: {what} this {type(pipe).__name__} (a LoRA for another "
                           f"model?): {detail}") from None
    adapted = _adapted_layers(pipe)
    where = adapted.get(denoiser, 0)
    elsewhere = sorted(n for n, c in adapted.items() if c and n != denoiser)
    if where < wanted or (into and elsewhere):
        _unload(pipe)
        if into and elsewhere:
            raise WeightsError(f"--fuse-lora {path.name}: {type(pipe).__name__} loaded it into "
                               f"{', '.join(elsewhere)}, not {denoiser}")
        what = "no layer" if where == 0 else f"only {where} of its {wanted} layers"
        raise WeightsError(f"--fuse-lora {path.name}: targets {what} of this {type(pipe).__name__}"
                           f"{'' if denoiser == main else f' {denoiser}'} (a LoRA for another model?)")
    with torch.no_grad():
        if into:
            pipe.fuse_lora(components=[denoiser], lora_scale=scale, adapter_names=[ADAPTER])
        else:
            pipe.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER])
    _unload(pipe)
    return {"file": path.name, "sha256": sha256(path), "scale": scale, "layers": where}


def _adapted_layers(pipe) -> dict[str, int]:
    """{component name: its modules that received the bake adapter}."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: sum(1 for m in component.modules()
                      if isinstance(m, BaseTunerLayer) and ADAPTER in getattr(m, "lora_A", {}))
            for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)}


def _unload(pipe) -> None:
    """Drop the adapter (after fusing: its product stays in the base weights)."""
    pipe.unload_lora_weights()
