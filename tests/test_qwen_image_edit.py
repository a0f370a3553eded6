"""Qwen-Image-Edit and its Plus pipeline on the tiny random build: the real diffusers pipelines,
Qwen2.5-VL text encoder (vision tower included) and Qwen2-VL processor, on a tokenizer made in code.

Each tiny job encodes its references at about 1 MP (the pipelines' own resize), which is most of
its time on a CPU; the pipelines are built once per module.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from app.config import Settings
from app.errors import InvalidInput
from app.families import family_for_pipeline_class, family_for_tiny, family_named
from app.families.base import synthetic_image
from app.families.qwen_image_edit import FAMILY, calculate_dimensions
from app.schema import parse_job

EDIT, PLUS = FAMILY
TINY_EDIT, TINY_PLUS = EDIT.tiny_variant(), PLUS.tiny_variant()
REF = "data:image/png;base64,"  # a reference the parser accepts; the tests hand decoded images to generate


@pytest.fixture(scope="module")
def edit_pipe():
    return _quiet(TINY_EDIT.build_tiny())


@pytest.fixture(scope="module")
def plus_service(tmp_path_factory):
    """One tiny Plus worker for the module: its pipeline serves the direct calls and the try-on job."""
    from app.service import Service

    return Service.load(Settings(model="tiny-qwen-image-edit-plus", output_uri=str(tmp_path_factory.mktemp("try-on")),
                                 preflight=False, device="cpu", warmup=False))


@pytest.fixture(scope="module")
def plus_pipe(plus_service):
    assert type(plus_service.pipe).__name__ == "QwenImageEditPlusPipeline"
    return plus_service.pipe


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def person():
    return synthetic_image(96, 128, seed=1)  # 3:4, portrait


def garment():
    return synthetic_image(80, 80, seed=2)


def run(family, pipe, images, **raw):
    job = parse_job({"prompt": "put the red shirt on the person", "images": [REF] * len(images), "seed": 7,
                     **raw}, family)
    job = job.with_size(*family.output_size(job, images))
    out = family.generate(pipe, job, None, images)
    assert len(out) == job.num_images
    return job, out


def pixels(im) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


# --- the families and their contract ------------------------------------------------------------------

def test_two_families_one_per_pipeline_class():
    assert family_for_pipeline_class("QwenImageEditPipeline") is EDIT
    assert family_for_pipeline_class("QwenImageEditPlusPipeline") is PLUS
    assert family_named("qwen-image-edit-plus") is PLUS
    assert family_for_tiny("tiny-qwen-image-edit") is EDIT and family_for_tiny("tiny-qwen-image-edit-plus") is PLUS
    assert (EDIT.max_images, PLUS.max_images) == (1, 3)
    for fam in (EDIT, PLUS):
        assert fam.requires_image and not fam.fuse_qkv and fam.img2img_class is None
        assert (fam.defaults.steps, fam.defaults.guidance, fam.defaults.width, fam.defaults.height) == (40, 4.0, 1024, 1024)
        assert fam.checkpoint_keys == "weights.qwen_image_keys"


def test_buckets_are_qwens_own_sizes_and_warm_up_carries_a_reference():
    assert calculate_dimensions(1024 * 1024, 4 / 3) == (1184, 896)
    assert PLUS.shapes == ((1024, 1024), (1184, 896), (896, 1184))
    for w, h in PLUS.shapes:
        assert w % 16 == 0 and h % 16 == 0  # VAE 8x, then 2x2 patches
    warm = PLUS.warmup_jobs(PLUS.shapes)
    assert [(x.job.width, x.job.height) for x in warm] == list(PLUS.shapes)
    assert all(len(x.images) == 1 and x.images[0].size == (x.job.width, x.job.height) for x in warm)


def refused(family, **raw) -> InvalidInput:
    with pytest.raises(InvalidInput) as e:
        parse_job({"prompt": "a shirt", **raw}, family)
    return e.value


def test_image_count_is_checked_by_name():
    assert refused(PLUS, images=[REF] * 4).field == "images"
    assert "at most 3" in refused(PLUS, images=[REF] * 4).message
    assert refused(EDIT, images=[REF] * 2).field == "images"
    for fam in (EDIT, PLUS):
        e = refused(fam)
        assert e.field == "image" and "edits an input image" in e.message
    assert refused(PLUS, images=[REF], strength=0.5).field == "strength"  # no image-to-image task


def test_output_size_follows_qwens_rule_unless_the_job_gives_one():
    job = parse_job({"prompt": "x", "image": REF}, PLUS)
    assert PLUS.output_size(job, [Image.new("RGB", (3000, 4000))]) == (896, 1184)
    assert PLUS.output_size(job, [Image.new("RGB", (300, 300)), Image.new("RGB", (40, 90))]) == (1024, 1024)
    sized = parse_job({"prompt": "x", "image": REF, "width": 768, "height": 512}, PLUS)
    assert PLUS.output_size(sized, [Image.new("RGB", (300, 300))]) == (768, 512)


def test_true_cfg_call_arguments():
    job = parse_job({"prompt": "x", "images": [REF, REF], "num_images": 2, "seed": 3}, PLUS).with_size(256, 256)
    kw = PLUS.call_kwargs(job, None, [garment(), person()])
    assert kw["true_cfg_scale"] == 4.0 and kw["negative_prompt"] == " " and "guidance_scale" not in kw
    assert kw["prompt"] == "x" and kw["num_images_per_prompt"] == 2 and len(kw["image"]) == 2
    assert [g.initial_seed() for g in kw["generator"]] == [3, 4]
    off = parse_job({"prompt": "x", "image": REF, "guidance_scale": 1.0, "negative_prompt": "blurry"}, EDIT)
    kw = EDIT.call_kwargs(off.with_size(256, 256), None, [person()])
    assert kw["true_cfg_scale"] == 1.0 and "negative_prompt" not in kw and isinstance(kw["image"], Image.Image)
    neg = parse_job({"prompt": "x", "image": REF, "negative_prompt": "blurry"}, EDIT).with_size(256, 256)
    assert EDIT.call_kwargs(neg, None, [person()])["negative_prompt"] == "blurry"


def test_fp8_skip_list_matches_exactly_the_layers_meant():
    from diffusers import QwenImageTransformer2DModel

    t = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 4, 4))
    names = [n for n, _ in t.named_modules() if n]
    for pattern in PLUS.quant_skip:  # each pattern names something real (a renamed module would drift silently)
        assert any(re.fullmatch(pattern, n) for n in names), pattern
    linears = [n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)]
    kept = {n for n in linears if PLUS.skips(n)}
    expected = {"img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1",
                "time_text_embed.timestep_embedder.linear_2", "norm_out.linear", "proj_out",
                *(f"transformer_blocks.{i}.{s}_mod.1" for i in range(2) for s in ("img", "txt"))}
    assert kept == expected
    quantized = set(linears) - kept  # attention projections and MLPs of every block
    assert all(n.startswith("transformer_blocks.") and (".attn." in n or "_mlp." in n) for n in quantized)
    assert "transformer_blocks.1.img_mlp.net.0.proj" in quantized and "transformer_blocks.0.attn.to_q" in quantized


def test_tiny_tokenizer_cuts_the_template_head_like_qwens():
    from app.families.qwen_image_edit import _TEMPLATE_HEAD, _tiny_tokenizer

    tok = _tiny_tokenizer()
    assert len(tok(_TEMPLATE_HEAD)["input_ids"]) == 64  # the pipelines drop exactly these 64
    ids = tok("<|vision_start|><|image_pad|><|vision_end|>")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]


# --- the pipelines -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def edited(edit_pipe):
    return run(TINY_EDIT, edit_pipe, [person()])


def test_edit_one_image_output_size_from_the_input(edited):
    job, (out,) = edited
    assert (job.width, job.height) == TINY_EDIT.output_size(job.model_copy(update={"width": None, "height": None}),
                                                            [person()])
    assert out.size == (job.width, job.height) == (256, 320)  # ~256x256 at 3:4 (224x288), raised to the 256 side minimum; sides of 32 (tiny's 16x VAE)


def test_same_seed_same_bytes_and_true_cfg_changes_the_output(edit_pipe, edited):
    _, (first,) = edited
    _, (again,) = run(TINY_EDIT, edit_pipe, [person()])
    assert np.array_equal(pixels(first), pixels(again))
    _, (no_cfg,) = run(TINY_EDIT, edit_pipe, [person()], guidance_scale=1.0)
    assert np.abs(pixels(first) - pixels(no_cfg)).max() > 0


@pytest.mark.parametrize("n", [2, 3])
def test_plus_takes_two_and_three_images(plus_pipe, n):
    images = [person(), garment(), synthetic_image(64, 64, seed=3)][:n]
    job, (out,) = run(TINY_PLUS, plus_pipe, images, width=256, height=256, guidance_scale=1.0)
    assert out.size == (256, 256)


# --- try-on: person + garment through Service.run ---------------------------------------------------------

def _data_uri(im) -> str:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_try_on_recipe_runs_through_the_service(plus_service):
    """The README's try-on recipe: the person first (the output takes its aspect ratio), the garment
    second, and a prompt saying what to do."""
    svc = plus_service
    job = {"prompt": "the person in picture 1 wears the shirt of picture 2, same pose, same background",
           "images": [_data_uri(person()), _data_uri(garment())], "guidance_scale": 1.0, "seed": 5}
    result = svc.run(job, "try-on-1")
    assert "error" not in result, result
    (img,) = result["images"]
    assert (img["width"], img["height"]) == (256, 320)
    out = Image.open(Path(urlparse(img["url"]).path))
    assert out.size == (256, 320)
    too_many = svc.run({**job, "images": job["images"] * 2}, "try-on-2")
    assert too_many["error"]["field"] == "images"
