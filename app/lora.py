"""A job's LoRAs: read with diffusers' own converters, mapped onto the denoiser's branches, written in place.

`Loras(pipe, family, cache)` exists on a worker started with LORAS=1 (the recipe gave every denoiser
linear a zero branch: weights.lora_branch). Per job, `use(refs, fetch)` gets each file through the
content-addressed disk cache (app.lora_cache), reads it once into host memory (an LRU of the last few),
checks every layer it targets against the model, and overwrites the branches: the sum of the job's
LoRAs, each scale folded into B, q/k/v pieces placed in the fused projection's rows. A job without
LoRAs zeroes the branches the previous one wrote; the same LoRAs at the same scales write nothing.

Formats are diffusers' (`<Pipeline>.lora_state_dict`: peft/diffusers keys, Kohya, XLabs, ...). The
alpha scaling is peft's: alpha / rank from the file's `.alpha` tensors (network alphas) or its peft
metadata (`lora_adapter_metadata`), else 1 (diffusers' convention when a file has neither).
"""

from __future__ import annotations

import inspect
import json
import math
import re
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from loguru import logger

from app.errors import InvalidInput, JobFailed, WorkerBroken
from app.fetch import FetchLimits, fetch_bytes
from app.limits import LORA_FETCH_DEADLINE_S
from weights.lora_branch import branches, unwrap
from weights.quantize import FUSED

KEEP_PARSED = 4  # LoRAs kept read in host memory: a job reusing one skips the disk and the conversion
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(\.[A-Za-z0-9_]+)?\.weight$")

if TYPE_CHECKING:
    from app.config import Settings
    from app.schema import Job

Parsed = dict  # module name (the unfused diffusers name) -> (A [r, in], B [out, r], alpha scaling), the file's dtype


class Loras:
    def __init__(self, pipe, family, cache, rank: int):
        self.pipeline_class = type(pipe)
        if not hasattr(self.pipeline_class, "lora_state_dict"):
            raise WorkerBroken(f"bad configuration LORAS: {self.pipeline_class.__name__} has no LoRA loader in "
                               "diffusers", field="LORAS")
        self.prefix = getattr(self.pipeline_class, "transformer_name", None) or family.denoiser
        self.slots = branches(getattr(pipe, family.denoiser))
        self.kinds = {n: type(m).__name__ for n, m in unwrap(getattr(pipe, family.denoiser)).named_modules()}
        self.cache, self.rank, self.model = cache, rank, type(getattr(pipe, family.denoiser)).__name__
        self.active: tuple = ()  # ((sha256, scale), ...) the branches hold now
        self.written: set[str] = set()  # branches holding a non-zero LoRA
        self._parsed: OrderedDict[str, Parsed] = OrderedDict()
        logger.info("LoRA branches on {} linears, rank {} each (x3 on fused QKV)", len(self.slots), rank)

    @classmethod
    def from_settings(cls, pipe, family, settings: Settings, rank: int) -> "Loras":
        """The per-job LoRA state of a LORAS=1 worker, its files cached under LORA_CACHE."""
        from app.lora_cache import LoraCache

        root = settings.lora_cache or str(Path(settings.cache_dir) / "loras")
        return cls(pipe, family, LoraCache(root, settings.lora_cache_mb << 20), rank)

    def for_job(self, job: Job, limits: FetchLimits, max_bytes: int, deadline: float) -> list[dict]:
        """`use` for `job`'s LoRAs (none clears the last job's), each file fetched under `limits` (the job's
        input guard), `max_bytes` and what is left of `deadline`."""
        return self.use(job.loras or (), fetcher(limits, max_bytes, deadline))

    def use(self, refs, fetch: Callable[[str, str], bytes]) -> list[dict]:
        """Make the branches hold the job's `refs` (schema LoraRef, job order; () for none): their result
        records [{"sha256", "scale", "layers"}]. `fetch(source, field)` returns a file's bytes under the
        fetch guard. InvalidInput naming `loras[i]` for a file that cannot be applied; then nothing changed."""
        loaded = []
        for i, ref in enumerate(refs):
            field = f"loras[{i}]"
            sha, path, _ = self.cache.get(ref.source, lambda: fetch(ref.source, field), ref.sha256, field)
            loaded.append((field, sha, self._read(sha, path, field), ref.scale))
        key = tuple((sha, scale) for _, sha, _, scale in loaded if scale != 0)
        records = [dict(sha256=sha, scale=scale, layers=len(parsed)) for _, sha, parsed, scale in loaded]
        plan = self._layout(loaded)
        if key != self.active:
            for name in self.written - plan.keys():
                self.slots[name].clear()
            for name, parts in plan.items():
                self.slots[name].write(parts)
            self.written, self.active = set(plan), key
        return records

    # -- reading ---------------------------------------------------------------------------------------
    def _read(self, sha: str, path: Path, field: str) -> Parsed:
        parsed = self._parsed.get(sha)
        if parsed is None:
            parsed = read_lora(path, self.pipeline_class, self.prefix, field)
            self._parsed[sha] = parsed
            while len(self._parsed) > KEEP_PARSED:
                self._parsed.popitem(last=False)
        self._parsed.move_to_end(sha)
        return parsed

    # -- placing ---------------------------------------------------------------------------------------
    def _layout(self, loaded) -> dict[str, list]:
        """branch name -> [(first row, A, scale x B)], every target checked (zero scales too: a LoRA
        that names a layer this model lacks is refused whatever its scale)."""
        plan: dict[str, list] = {}
        for field, _, parsed, scale in loaded:
            for module, (a, b, alpha) in parsed.items():
                name, row, rows = self._target(module, field)
                slot = self.slots[name]
                if a.shape[1] != slot.in_features or b.shape[0] != rows:
                    raise InvalidInput(f"{field}: layer {module} is {slot.in_features} -> {rows} in this model, "
                                       f"the LoRA's is {a.shape[1]} -> {b.shape[0]} (a LoRA for another model?)",
                                       field=field)
                if scale != 0:
                    plan.setdefault(name, []).append((row, a, b.float() * (scale * alpha)))
        for name, parts in plan.items():
            need, cap = sum(a.shape[0] for _, a, _ in parts), self.slots[name].lora_capacity
            if need > cap:
                raise InvalidInput(f"loras: layer {name} needs rank {need} for these LoRAs, over this worker's "
                                   f"{cap} (LORA_MAX_RANK={self.rank} per projection)", field="loras")
        return plan

    def _target(self, module: str, field: str) -> tuple[str, int, int]:
        """(branch name, first output row, rows) of a LoRA layer: itself, or its piece of a fused projection."""
        slot = self.slots.get(module)
        if slot is not None:
            return module, 0, slot.out_features
        parent, _, attr = module.rpartition(".")
        for fused, originals in FUSED.items():
            slot = self.slots.get(f"{parent}.{fused}" if parent else fused)
            if attr in originals and slot is not None and slot.lora_pieces == len(originals):
                rows = slot.out_features // len(originals)
                return f"{parent}.{fused}" if parent else fused, originals.index(attr) * rows, rows
        if module in self.kinds:  # a convolution (LoCon), a norm...: not what a branch sits beside
            raise InvalidInput(f"{field}: targets layer {_short(module)}, a {self.kinds[module]}: a per-job LoRA "
                               "adapts linear layers only", field=field)
        raise InvalidInput(f"{field}: targets layer {_short(module)}, which this {self.model} does not have "
                           "(a LoRA for another model?)", field=field)


def refuse_unless_taken(loras: Loras | None, job: Job) -> None:
    """InvalidInput naming `loras` for a job with LoRAs on a worker that takes none (checked before any
    fetch or GPU work)."""
    if job.loras and loras is None:
        raise InvalidInput("loras: this worker takes no per-job LoRA (it starts with LORAS=1 to take them)",
                           field="loras")


def fetcher(limits: FetchLimits, max_bytes: int, deadline: float) -> Callable[[str, str], bytes]:
    """`fetch(source, field)`: a LoRA file's bytes under the input guard, its own size cap and the
    smaller of its own deadline and what is left of the job's."""
    base = replace(limits, max_bytes=max_bytes, formats=(), what="LoRA file")

    def fetch(source: str, field: str) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise JobFailed(f"{field}: no time left to fetch it within the job's deadline", field=field)
        return fetch_bytes(source, replace(base, deadline_s=min(LORA_FETCH_DEADLINE_S, left)), field)

    return fetch


def read_lora(path: Path, pipeline_class, prefix: str, field: str) -> Parsed:
    """The denoiser layers of the LoRA file at `path`, converted by diffusers for `pipeline_class`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise InvalidInput(f"{field}: not a readable safetensors file", field=field) from None
    if not state or not all(t.is_floating_point() for t in state.values()):
        raise InvalidInput(f"{field}: no LoRA tensors in it (empty, or not floating point)", field=field)
    alphas = {}
    try:
        if "return_alphas" in inspect.signature(pipeline_class.lora_state_dict).parameters:
            state = pipeline_class.lora_state_dict(state, return_alphas=True)
        else:
            state = pipeline_class.lora_state_dict(state)
        if isinstance(state, tuple):  # (state, network alphas): FLUX's when asked, SDXL's always
            state, alphas = state[0], state[1]
    except Exception as e:  # diffusers' converters raise ValueError, KeyError, IndexError... on odd files
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InvalidInput(f"{field}: not a LoRA format diffusers reads for {pipeline_class.__name__}: "
                           f"{_short(detail, 200)}", field=field) from None
    alphas = {**{k: v for k, v in state.items() if k.endswith(".alpha")}, **(alphas or {})}
    ours = {}
    for key, t in state.items():
        if key.endswith(".alpha"):
            continue
        head, dot, rest = key.partition(".")
        if head != prefix or not dot:
            raise InvalidInput(f"{field}: has layers outside the {prefix} ({_short(key)}); a per-job LoRA adapts "
                               f"the {prefix} only", field=field)
        ours[rest] = t
    if ours and not any(_FACTOR.match(k) for k in ours):  # the older diffusers layout (lora.down/up)
        from diffusers.utils import convert_unet_state_dict_to_peft

        ours = convert_unet_state_dict_to_peft(ours)
    factors: dict[str, dict] = {}
    for key, t in ours.items():
        m = _FACTOR.match(key)
        if m is None:
            raise InvalidInput(f"{field}: tensor {_short(key)} is not a LoRA factor (lora_A / lora_B weight); "
                               "DoRA, LoKr, biases and full weight diffs are not applied per job", field=field)
        factors.setdefault(m["module"], {})[m["kind"]] = t
    if not factors:
        raise InvalidInput(f"{field}: no LoRA layers for the {prefix} in it", field=field)
    config = _peft_config(meta, prefix)
    out = {}
    for module, ab in factors.items():
        a, b = ab.get("lora_A"), ab.get("lora_B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise InvalidInput(f"{field}: layer {_short(module)} has no matching lora_A [r, in] and lora_B "
                               "[out, r]", field=field)
        out[module] = (a, b, _scaling(module, a.shape[0], alphas, prefix, config))
    return out


def _scaling(module: str, rank: int, alphas: dict, prefix: str, config: dict) -> float:
    """peft's alpha / r for this layer (alpha / sqrt(r) under rsLoRA); 1 when the file gives no alpha."""
    alpha = alphas.get(f"{prefix}.{module}.alpha", alphas.get(f"{module}.alpha"))
    if alpha is None and config:
        pattern = config.get("alpha_pattern") or {}
        alpha = next((v for k, v in pattern.items() if module == k or module.endswith(f".{k}")),
                     config.get("lora_alpha"))
    if alpha is None:
        return 1.0
    alpha = float(alpha.item() if torch.is_tensor(alpha) else alpha)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _peft_config(meta: dict, prefix: str) -> dict:
    """The peft LoraConfig a diffusers-saved file carries in its metadata, keys without `prefix.`."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(cfg, dict):
        return {}
    return {k.removeprefix(f"{prefix}."): v for k, v in cfg.items()}


def _short(text: str, n: int = 120) -> str:
    """A name from the caller's file, as an error may echo it: printable, bounded."""
    clean = "".join(c if c.isascii() and c.isprintable() else "?" for c in text[:n])
    return clean + ("..." if len(text) > n else "")
