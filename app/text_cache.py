"""An LRU of encoded prompts: a repeated prompt skips the text encoders (T5-XXL is ~10% of a FLUX job).

Keyed by everything the embedding depends on (model, family, prompt, negative prompt, sequence
length, and a family's extras such as CFG on/off); bounded in bytes (`TEXT_CACHE_MB`), the least
recently used entry evicted first. Values are the keyword arguments the pipeline takes instead of
the prompt (`prompt_embeds`, ...) for one image, kept in host memory (pinned on a CUDA worker, so a
hit is one fast copy and the cache takes no VRAM). `TextEncoding` is how a job reaches it, with the
T5 prompt-length buckets (`TEXT_BUCKETS`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

# T5 sequence lengths a prompt is padded to when TEXT_BUCKETS is on: the smallest that holds it
T5_BUCKETS = (128, 256, 384, 512)


@dataclass(frozen=True)
class TextKey:
    model: str
    family: str
    prompt: str
    negative_prompt: str | None
    max_sequence_length: int | None
    extra: tuple = ()  # whatever else the family's encode depends on (e.g. CFG on/off)


def nbytes(value: dict) -> int:
    """Bytes held by the tensors of one cached value (other values count nothing)."""
    return sum(v.numel() * v.element_size() for v in value.values() if hasattr(v, "element_size"))


class TextCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[TextKey, dict] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # one job at a time today; the jobs API may overlap encodes later
        self.hits = self.misses = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: TextKey) -> dict | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: TextKey, value: dict) -> bool:
        """Keep `value` (evicting the oldest entries to fit); False when it alone exceeds the budget."""
        size = nbytes(value)
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= nbytes(old)
            while self._items and self._bytes + size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= nbytes(evicted)
            self._items[key] = value
            self._bytes += size
        return True

    def encode(self, key: TextKey, encode) -> tuple[dict, bool]:
        """The cached value for `key`, or `encode()`'s (then cached); and whether it was a hit."""
        value = self.get(key)
        if value is not None:
            return value, True
        value = encode()
        self.put(key, value)
        return value, False


def bucket_for(tokens: int, buckets) -> int:
    """The smallest bucket holding `tokens` tokens; the largest when none does (the prompt is truncated)."""
    fits = [b for b in sorted(buckets) if b >= tokens]
    return fits[0] if fits else max(buckets)


def _to_host(value: dict) -> dict:
    """A cache entry's own copy in host memory (pinned when it came from the GPU)."""
    import torch

    out = {}
    for k, v in value.items():
        if isinstance(v, torch.Tensor):
            host = torch.empty(v.shape, dtype=v.dtype, pin_memory=v.is_cuda)
            host.copy_(v)
            v = host
        out[k] = v
    return out


def _to_device(value: dict, device) -> dict:
    import torch

    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in value.items()}


@dataclass(frozen=True)
class TextEncoding:
    """How a worker turns a job's prompts into embeddings: its cache (None: off), the model the
    entries belong to, whether T5 lengths are bucketed, and a warm-up's forced length."""

    cache: TextCache | None = None
    model: str = ""
    buckets: bool = False
    length: int | None = None

    @classmethod
    def from_settings(cls, settings, model: str) -> "TextEncoding":
        mb = settings.text_cache_mb
        return cls(TextCache(mb << 20) if mb > 0 else None, model, settings.text_buckets)

    def at_length(self, length: int | None) -> "TextEncoding":
        """This encoding with the sequence length forced (warming one bucket); None: unchanged."""
        return self if length is None else replace(self, length=length)

    def embeddings(self, key: TextKey, encode, device, timings: dict | None = None) -> dict:
        """`encode()`'s value for `key`, from the cache when it holds it; records `text_encode_ms` and
        `text_cache` (hit, miss, or off) in `timings`. A hit's tensors are copies on `device`."""
        import torch

        t0 = time.perf_counter()
        key = replace(key, model=self.model)
        value = self.cache.get(key) if self.cache is not None else None
        if value is not None:
            value, status = _to_device(value, device), "hit"
        else:
            value = encode()
            status = "off"
            if self.cache is not None:
                self.cache.put(key, _to_host(value))
                status = "miss"
        if torch.device(device).type == "cuda":  # the encode ran asynchronously: time what it really took
            torch.cuda.synchronize(device)
        if timings is not None:
            timings["text_encode_ms"] = round((time.perf_counter() - t0) * 1000, 2)
            timings["text_cache"] = status
        return value
