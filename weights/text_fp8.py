"""FP8 text encoders in a baked directory (`python -m weights bake --text-encoders fp8`).

Written: each text encoder's `save_pretrained` after `weights.quantize.quantize_text_encoder` swapped its
repeated-layer linears to FP8Linear, so their weights are stored as e4m3 codes (a byte a weight), plus
`fp8_scales.safetensors` beside them: the per-row scales keyed by module name (the component's own
files may rename keys on save; this file does not). The manifest records which linears are FP8.

Read: the component's own `from_pretrained` (which builds the model, ties its weights and fills its
non-persistent buffers) loads the codes into plain linears as numbers; every e4m3 value is exactly a
bf16 and an fp32 value, so casting back gives the stored codes bit for bit, and `restore` swaps those
linears back to FP8Linear with them and the recorded scales. The codes pass through a float copy in host
memory for a moment (from_pretrained's dtype), the GPU only ever sees FP8.
"""

from __future__ import annotations

from pathlib import Path

import torch

from weights.errors import IntegrityError
from weights.fp8 import E4M3, FP8Linear
from weights.quantize import quantize_text_encoder

SCALES = "fp8_scales.safetensors"


def text_encoders(pipe) -> dict:
    """The pipeline's text encoder modules by component name (diffusers names them text_encoder*)."""
    return {n: m for n, m in pipe.components.items() if n.startswith("text_encoder") and isinstance(m, torch.nn.Module)}


def quantize_encoders(pipe) -> dict[str, list[str]]:
    """FP8Linear on every text encoder of `pipe`, in place; component -> the linears swapped."""
    return {name: quantize_text_encoder(module, "fp8") for name, module in text_encoders(pipe).items()}


def write_scales(pipe, layers: dict[str, list[str]], root: Path) -> None:
    """`fp8_scales.safetensors` in each quantized encoder's folder under `root` (after save_pretrained)."""
    from safetensors.torch import save_file

    for name, names in layers.items():
        module = getattr(pipe, name)
        scales = {n: module.get_submodule(n).weight_scale.detach().contiguous().cpu() for n in names}
        save_file(scales, str(Path(root) / name / SCALES))


def restore(pipe, root: Path, layers: dict[str, list[str]]) -> int:
    """Swap the recorded linears of each loaded text encoder back to FP8Linear (codes from the loaded
    weights, scales from `fp8_scales.safetensors`); the number swapped."""
    from safetensors.torch import load_file

    swapped = 0
    for name, names in layers.items():
        module = getattr(pipe, name, None)
        where = Path(root) / name / SCALES
        if module is None:
            raise IntegrityError(f"{root}: the manifest records FP8 text encoder {name!r}, the pipeline has none")
        try:
            scales = load_file(str(where))
        except (OSError, ValueError) as e:
            raise IntegrityError(f"{where}: unreadable ({type(e).__name__}: {e})") from None
        for n in names:
            lin = module.get_submodule(n) if _has(module, n) else None
            if not isinstance(lin, torch.nn.Linear) or n not in scales:
                raise IntegrityError(f"{where}: FP8 layer {name}.{n} is missing from the loaded model or its scales")
            q = FP8Linear(lin.in_features, lin.out_features, lin.bias is not None, device="meta",
                          out_dtype=lin.weight.dtype)
            q.weight = lin.weight.data.to(E4M3)
            q.weight_scale = scales[n].to(device=lin.weight.device, dtype=torch.float32)
            q.bias = None if lin.bias is None else lin.bias.data
            parent, _, attr = n.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, attr, q)
            swapped += 1
    return swapped


def _has(module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False
