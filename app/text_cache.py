"""An LRU of encoded prompts: a repeated prompt skips the text encoders (T5-XXL is ~10% of a FLUX job).

Keyed by everything the embedding depends on (model, family, prompt, negative prompt, sequence
length); bounded in bytes (`TEXT_CACHE_MB`), the least recently used entry evicted first. Values are
the keyword arguments the pipeline takes instead of the prompt (`prompt_embeds`, ...), kept where
the plan says (the GPU, or host memory when the encoders live off the GPU).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class TextKey:
    model: str
    family: str
    prompt: str
    negative_prompt: str | None
    max_sequence_length: int | None


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
