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


# ---- wired into the job path: Service.run on the tiny FLUX and SDXL ----------------------------------

import pytest  # noqa: E402

from app.config import Settings  # noqa: E402
from app.service import Service  # noqa: E402
from app.text_cache import T5_BUCKETS, TextEncoding, bucket_for  # noqa: E402

FAST = {"num_inference_steps": 2, "width": 256, "height": 256}


def _fresh(service: Service, **settings) -> Service:
    """The session's loaded pipeline under other settings, with a cache of its own."""
    return Service(service.pipe, service.source, service.settings.model_copy(update=settings), service.plan,
                   service.store, {})


def _png(service, out_key):
    from pathlib import Path

    return Path(service.settings.output_uri, out_key).read_bytes()


def _images(service, job_id, **job):
    out = service.run({"prompt": "a red sneaker on a table", "seed": 3, **FAST, **job}, job_id)
    assert "error" not in out, out
    return out["timings"], [_png(service, im["key"]) for im in out["images"]]


def test_a_hit_gives_the_same_bytes_as_the_miss_and_as_no_cache(tiny_flux_service):
    svc = _fresh(tiny_flux_service)
    t1, miss = _images(svc, "tc-miss")
    t2, hit = _images(svc, "tc-hit")
    t3, off = _images(_fresh(tiny_flux_service, text_cache_mb=0), "tc-off")
    assert (t1["text_cache"], t2["text_cache"], t3["text_cache"]) == ("miss", "hit", "off")
    assert all(t["text_encode_ms"] >= 0 for t in (t1, t2, t3))
    assert miss == hit == off  # the cache changes no byte
    assert len(svc.text.cache) == 1 and svc.text.cache.hits == 1


def _status(svc, text, **job):
    """The cache status of one job's text encode (the family's own with_text; no denoising: CPU-cheap)."""
    from app.schema import parse_job

    j = parse_job({"prompt": "a red sneaker", **FAST, **job}, svc.family)
    timings = {}
    kw = svc.family.with_text(svc.pipe, j, svc.family.call_kwargs(j), text, timings)
    assert "prompt" not in kw and kw["prompt_embeds"].shape[0] == j.num_images
    return timings["text_cache"]


def test_keying_through_jobs_sdxl_negative_prompt_and_cfg(tiny_sdxl_service):
    svc = _fresh(tiny_sdxl_service)
    statuses = [_status(svc, svc.text, **job) for job in
                [{}, {"negative_prompt": "blurry"}, {"negative_prompt": "blurry", "num_images": 2},
                 {"guidance_scale": 1.0}, {}]]
    # a different negative prompt is a miss; CFG off (guidance 1) needs no negative embeddings: another key;
    # the number of images is not in the key (one image's embeddings, repeated)
    assert statuses == ["miss", "miss", "hit", "miss", "hit"]


def test_a_different_length_is_a_miss_and_eviction_bounds_the_bytes(tiny_flux_service):
    svc = _fresh(tiny_flux_service)
    text = svc.text
    one = nbytes(svc.family.encode(svc.pipe, "a cat"))  # the tiny T5 at 64 tokens: one entry's bytes
    small = TextEncoding(TextCache(2 * one), text.model)
    for prompt in ("a cat", "a dog", "a cow"):
        small.embeddings(TextKey("", "flux", prompt, None, 64), lambda: svc.family.encode(svc.pipe, "x"), "cpu")
    assert len(small.cache) == 2 and small.cache.bytes <= 2 * one
    timings = {}
    small.embeddings(TextKey("", "flux", "a cat", None, 64), lambda: svc.family.encode(svc.pipe, "x"), "cpu", timings)
    assert timings["text_cache"] == "miss"  # evicted, the oldest
    small.embeddings(TextKey("", "flux", "a cow", None, 32), lambda: svc.family.encode(svc.pipe, "x", 32), "cpu",
                     timings)
    assert timings["text_cache"] == "miss"  # same prompt, another sequence length


def test_bucket_choice_by_token_count():
    assert [bucket_for(n, T5_BUCKETS) for n in (1, 128, 129, 256, 300, 384, 385, 512, 900)] == \
        [128, 128, 256, 256, 384, 384, 512, 512, 512]


def test_flux_prompt_picks_the_smallest_bucket_that_holds_it(tiny_flux_service):
    """The real T5 tokenizer count on the tiny pipeline, with FLUX.1-dev's 512-token default."""
    from dataclasses import replace

    fam = replace(svc_family := tiny_flux_service.family,
                  defaults=replace(svc_family.defaults, max_sequence_length=512))
    pipe = tiny_flux_service.pipe
    assert fam.length_buckets() == (128, 256, 384, 512)
    text = TextEncoding(buckets=True)
    lengths = {}
    for words in (5, 128, 129, 384, 385, 500):  # the tiny word tokenizer adds no end token (T5's would count)
        prompt = " ".join(["cat"] * words)
        tokens = fam.prompt_tokens(pipe, prompt)
        job = _job(fam, prompt)
        lengths[words] = (tokens, fam.text_length(pipe, job, text))
    assert lengths == {5: (5, 128), 128: (128, 128), 129: (129, 256), 384: (384, 384), 385: (385, 512),
                       500: (500, 512)}
    assert fam.text_length(pipe, _job(fam, "a cat"), TextEncoding()) == 512  # buckets off: the default
    assert fam.text_length(pipe, _job(fam, "a cat"), text.at_length(384)) == 384  # a bucket's warm-up


def _job(fam, prompt):
    from app.schema import parse_job

    return parse_job({"prompt": prompt, "width": 256, "height": 256}, fam)


@pytest.mark.parametrize("dynamic, expect", [("auto", [(256, 256, None), (272, 256, None), (288, 256, None),
                                                       (256, 256, 128), (256, 256, 256), (256, 256, 512)]),
                                             ("off", [(256, 256, None), (320, 320, None), (256, 256, 128),
                                                      (320, 320, 128), (256, 256, 256), (320, 320, 256)])])
def test_each_bucket_is_warmed(dynamic, expect):
    from app.families.flux import FAMILY as FLUX
    from app.optimize import Recipe, warmup_plan

    lengths = (64, 128, 256, 512) if dynamic == "auto" else (64, 128, 256)
    jobs = warmup_plan(FLUX, FLUX.warmup_jobs([(256, 256)] if dynamic == "auto" else [(256, 256), (320, 320)]),
                       Recipe(compile="regional", dynamic=dynamic), lengths)
    assert [(w.job.width, w.job.height, w.text_length) for w in jobs] == expect
