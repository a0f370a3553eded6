"""The text-embedding cache: hits, misses, keying and byte-bounded LRU eviction."""

import torch

from app.text_cache import TextCache, TextKey, nbytes


def _key(prompt="a cat", neg=None, length=512, model="m"):
    return TextKey(model, "flux", prompt, neg, length)


def _value(n=256):  # n fp32 values: 4n bytes
    return {"prompt_embeds": torch.zeros(n), "pooled_prompt_embeds": torch.zeros(0), "note": "not a tensor"}


def test_hit_after_miss_and_encode_called_once():
    cache, calls = TextCache(1 << 20), []
    enc = lambda: calls.append(1) or _value()  # noqa: E731
    v1, hit1 = cache.encode(_key(), enc)
    v2, hit2 = cache.encode(_key(), enc)
    assert (hit1, hit2) == (False, True) and v1 is v2 and len(calls) == 1
    assert (cache.hits, cache.misses) == (1, 1)


def test_everything_the_embedding_depends_on_is_in_the_key():
    cache = TextCache(1 << 20)
    cache.put(_key(), _value())
    for other in (_key(prompt="a dog"), _key(neg="blurry"), _key(length=256), _key(model="other")):
        assert cache.get(other) is None
    assert cache.get(_key()) is not None


def test_lru_eviction_by_bytes():
    one = nbytes(_value())
    assert one == 1024
    cache = TextCache(3 * one)
    for p in "abc":
        cache.put(_key(p), _value())
    cache.get(_key("a"))  # a is now the most recent: b is the oldest
    cache.put(_key("d"), _value())
    assert cache.get(_key("b")) is None
    assert all(cache.get(_key(p)) is not None for p in "acd")
    assert cache.bytes == 3 * one and len(cache) == 3


def test_value_over_budget_is_not_kept_and_replacing_a_key_counts_once():
    cache = TextCache(1000)
    assert cache.put(_key(), _value(1000)) is False and len(cache) == 0
    cache.put(_key(), _value(100))
    cache.put(_key(), _value(200))
    assert cache.bytes == 800 and len(cache) == 1
