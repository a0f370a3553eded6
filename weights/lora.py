"""Fuse a LoRA into a pipeline before it is baked: `python -m weights bake ... --fuse-lora FILE`.

The few-step LoRAs (Qwen-Image-Edit Lightning: 4 or 8 steps at CFG 1) are what make editing cheap;
fused into the denoiser's weights before quantization, the baked model runs them at no extra cost
per step and needs no LoRA at load. Loading, fusing and unloading are diffusers' own
(`load_lora_weights`, `fuse_lora(lora_scale=S)`, `unload_lora_weights`), so every LoRA format diffusers
reads (peft/diffusers keys, Kohya, the Lightning files) works the same here as in diffusers. A LoRA
with layers that match no module of the model is refused naming the file: diffusers only warns, and
a bake that silently dropped the LoRA would serve the wrong model.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from weights.errors import UnknownFormat, WeightsError

ADAPTER = "bake"
# one tensor per adapted layer, whatever the format: peft/diffusers lora_A, Kohya lora_down
_DOWN = re.compile(r"(^|\.)(lora_A|lora_down|lora\.down)(\.[^.]+)?\.weight$")


def add_arguments(bake_parser) -> None:
    """`python -m weights bake`'s LoRA and defaults flags."""
    bake_parser.add_argument("--fuse-lora", metavar="FILE", help="fuse this LoRA (safetensors) before quantizing")
    bake_parser.add_argument("--lora-scale", type=float, default=1.0, metavar="S", help="its weight (default 1)")
    bake_parser.add_argument("--steps", type=_bounded(int, 1, 100), metavar="N",
                             help="the baked model's default steps (a Lightning LoRA: 4 or 8)")
    bake_parser.add_argument("--guidance", type=_bounded(float, 0, 30), metavar="G",
                             help="the baked model's default guidance (a Lightning LoRA: 1, no CFG)")


def options(args) -> dict:
    """bake_extra's keyword arguments from the parsed flags."""
    return dict(lora=args.fuse_lora, lora_scale=args.lora_scale, steps=args.steps, guidance=args.guidance)


def bake_extra(pipe, lora: str | None = None, lora_scale: float = 1.0, steps: int | None = None,
               guidance: float | None = None) -> dict:
    """Fuse `lora` into `pipe` (in place); return what the manifest records: {"lora": ..., "defaults":
    {"steps", "guidance"}} (the worker's defaults for that bake), each only when given."""
    extra = {"lora": fuse_lora(pipe, lora, lora_scale)} if lora else {}
    defaults = {k: v for k, v in (("steps", steps), ("guidance", guidance)) if v is not None}
    if defaults:
        extra["defaults"] = defaults
    return extra


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


def fuse_lora(pipe, path: str | Path, scale: float = 1.0) -> dict:
    """Fuse the LoRA at `path` (safetensors) into `pipe` at `scale`, in place; return its manifest record
    {"file", "sha256", "scale", "layers"}. WeightsError naming the file when it cannot be read or
    when any of its layers matches no module of the model."""
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
    try:
        pipe.load_lora_weights(state, adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError) as e:  # peft: "Target modules ... not found"; shape mismatches
        _unload(pipe)
        detail = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        what = "targets no layer of" if "not found in the base model" in detail else "does not fit"
        raise WeightsError(f"--fuse-lora {path.name}: {what} this {type(pipe).__name__} (a LoRA for another "
                           f"model?): {detail}") from None
    adapted = _adapted_layers(pipe)
    if adapted < wanted:
        _unload(pipe)
        what = "no layer" if adapted == 0 else f"only {adapted} of its {wanted} layers"
        raise WeightsError(f"--fuse-lora {path.name}: targets {what} of this {type(pipe).__name__} "
                           "(a LoRA for another model?)")
    with torch.no_grad():
        pipe.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER])
    _unload(pipe)
    return {"file": path.name, "sha256": sha256(path), "scale": scale, "layers": adapted}


def _adapted_layers(pipe) -> int:
    """Modules of every pipeline component that received the bake adapter."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            n += sum(1 for m in component.modules()
                     if isinstance(m, BaseTunerLayer) and ADAPTER in getattr(m, "lora_A", {}))
    return n


def _unload(pipe) -> None:
    """Drop the adapter (after fusing: its product stays in the base weights)."""
    pipe.unload_lora_weights()
