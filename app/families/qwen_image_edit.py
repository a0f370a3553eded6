"""Qwen-Image-Edit: `QwenImageEditPipeline` (one input image) and `QwenImageEditPlusPipeline` (2509 and
2511: one to three images), over `QwenImageTransformer2DModel` (60 dual-stream blocks, 20B).

Two families of one module, one per pipeline class (a bake records the family by name, and the two
calls differ): `qwen-image-edit` and `qwen-image-edit-plus`. Both run true CFG: the job's
`guidance_scale` is the pipeline's `true_cfg_scale` (the transformer runs twice a step), with the
negative prompt " " when the job gives none, as the Qwen model card does, so CFG really runs. The
Qwen2.5-VL 7B text encoder sees the input images too. The pipelines encode each reference at about
one megapixel whatever its size (their own `calculate_dimensions`); an output size taken from the
input follows that rule too (about 1 MP at the first image's aspect ratio, sides multiples of 32).
Q/K/V stay unfused: Qwen-Image's attention processor reads to_q/to_k/to_v.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace

from app.families.base import Defaults, Family, StepCallback
from app.schema import Job

NEGATIVE_PROMPT = " "  # the model card's: an empty-looking negative prompt that still switches true CFG on
EDIT_AREA = 1024 * 1024  # the pipelines' own reference (and default output) area
SIZE_ROUND = 32  # calculate_dimensions rounds each side to 32

# The system prompt the pipelines wrap a job's prompt in; they drop its first 64 tokens (up to the
# user turn), so the tiny tokenizer splits it into exactly 64 tokens, like Qwen2.5's own.
_TEMPLATE_HEAD = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                  "objects, background), then explain how the user's text instruction should alter or modify the "
                  "image. Generate a new image that meets the user's requirements while maintaining consistency "
                  "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n")
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>")
_SPLIT = r"'s|\w+|[^\w\s]+|\n"  # words, punctuation runs and newlines, as Qwen2.5's BPE cuts this template


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about `area` pixels at `ratio`, sides rounded to 32: the pipelines' rule."""
    width = math.sqrt(area * ratio)
    return round(width / SIZE_ROUND) * SIZE_ROUND, round(width / ratio / SIZE_ROUND) * SIZE_ROUND


@dataclass(frozen=True)
class QwenImageEdit(Family):
    edit_area: int = EDIT_AREA  # the area an output size taken from the input gets

    def tiny_variant(self) -> Family:
        """The tiny VAE compresses 16x (not 8x: a 1 MP reference is encoded on every job, and conv3d is
        slow on a CPU), so its sides are multiples of 32; outputs from the input are 256x256-ish."""
        t = super().tiny_variant()
        return replace(t, multiple=32, edit_area=t.defaults.width * t.defaults.height)

    def output_size(self, job: Job, images: list) -> tuple[int, int]:
        """The job's size, or about `edit_area` at the first image's aspect ratio (Qwen's own rule), in bounds."""
        if not job.size_from_input:
            return job.width, job.height
        w, h = images[0].size
        return self.fit_size(*calculate_dimensions(self.edit_area, w / h))

    def call_kwargs(self, job: Job, on_step: StepCallback | None = None, images: list | None = None) -> dict:
        """One prompt and its images, `num_images_per_prompt` outputs (one generator each: the Plus
        pipeline refuses a batch of prompts); guidance is true CFG, with " " as the default negative."""
        kw = super().call_kwargs(job, on_step, None)
        kw.pop("guidance_scale")  # the pipelines' guidance_scale is for guidance-distilled models: unused here
        kw.pop("negative_prompt", None)
        kw.update(prompt=job.prompt, num_images_per_prompt=job.num_images, true_cfg_scale=job.guidance_scale,
                  image=list(images) if self.max_images > 1 else images[0])
        if job.guidance_scale > 1:
            kw["negative_prompt"] = job.negative_prompt or NEGATIVE_PROMPT
        return kw

    # -- the tiny random build -------------------------------------------------------------------------
    def build_tiny(self):
        """The real pipeline class on a 1-block transformer, a 16x VAE, a one-layer Qwen2.5-VL (its vision
        tower sees a 56x56 picture: 4 tokens) and a word-level tokenizer with Qwen's special tokens."""
        import diffusers
        import torch
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from app.tiny import eval_mode

        tokenizer = _tiny_tokenizer()
        ids = tokenizer.convert_tokens_to_ids
        torch.manual_seed(0)
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                             rope_scaling={"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
                             rope_theta=1e6, bos_token_id=None, eos_token_id=ids("<|im_end|>"),
                             pad_token_id=ids("<|endoftext|>")),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                               fullatt_block_indexes=[0]),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        ))
        z = 4
        vae = AutoencoderKLQwenImage(base_dim=4, z_dim=z, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=0,
                                     temperal_downsample=[False] * 4, latents_mean=[0.0] * z, latents_std=[1.0] * z)
        transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * z, out_channels=z, num_layers=1,
                                                  attention_head_dim=16, num_attention_heads=2,
                                                  joint_attention_dim=32, axes_dims_rope=(8, 4, 4))
        scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's published scheduler config
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
        )
        return eval_mode(getattr(diffusers, self.pipeline_class)(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            processor=_tiny_processor(tokenizer), transformer=transformer,
        ))


def _tiny_tokenizer():
    """A word-level fast tokenizer over the template's words, with the special tokens Qwen's template and
    Qwen2-VL's processor use (no download)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from app.tiny import WORDS

    head = _TEMPLATE_HEAD
    for s in _SPECIAL:
        head = head.replace(s, " ")
    words = sorted(set(re.findall(_SPLIT, head.lower())) | set(WORDS) | set("picture : 1 2 3 4 5 6 7 8 9 0".split()))
    vocab = {t: i for i, t in enumerate((*_SPECIAL, "[UNK]", *words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="[UNK]", model_max_length=1024)


def _tiny_processor(tokenizer):
    """Qwen2VLProcessor resizing every picture to 56x56 (4x4 patches of 14, merged 2x2: 4 image tokens)."""
    import transformers
    from transformers import Qwen2VLProcessor

    # without torchvision transformers falls back to the PIL image processor anyway; name it to skip the warning
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    images = cls(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2)
    with _absent_video_processor_allowed():
        return Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer)


@contextmanager
def _absent_video_processor_allowed():
    """transformers 5 checks every sub-processor's class, the absent video processor's too, and that
    check crashes (AttributeError in its class lookup) when torchvision is not installed. Accept None
    there while the tiny processor is built; every other check runs unchanged."""
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, arg):
        return None if arg is None and name == "video_processor" else check(self, name, arg)

    ProcessorMixin.check_argument_for_proper_class = lenient
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


_COMMON = dict(
    denoiser="transformer",
    # the model card's edit: 40 steps, true CFG 4, about 1 MP
    defaults=Defaults(1024, 1024, 40, 4.0),
    # 1:1 and Qwen's own 4:3 / 3:4 sizes near 1 MP (calculate_dimensions: 1184x896); the warm-up jobs
    # carry a reference image of each bucket's size, so its 1 MP of reference tokens is warmed too
    shapes=((1024, 1024), calculate_dimensions(EDIT_AREA, 4 / 3), calculate_dimensions(EDIT_AREA, 3 / 4)),
    # embedders, the text input norm, the final norm and projection, and every block's modulation
    # (img_mod / txt_mod) stay bf16
    quant_skip=(r"img_in", r"txt_in", r"time_text_embed\..*", r"txt_norm", r"norm_out\..*", r"proj_out",
                r"transformer_blocks\.\d+\.(img|txt)_mod\..*"),
    fuse_qkv=False,  # QwenDoubleStreamAttnProcessor2_0 reads to_q/to_k/to_v and add_{q,k,v}_proj
    negative_prompt=True,
    # 20B transformer 41 GB bf16 / 20.5 GB FP8, Qwen2.5-VL 7B encoder 16.6 GB bf16, VAE and 1 MP activations
    vram_gib={"bf16": 62.0, "fp8": 42.0, "int8": 42.0},
    # GiB per component (preflight.memory), counted on the published configs: the FP8 transformer is 25.4
    # (13.6B FP8, the 6.8B modulation parameters bf16: over a 24 GB card, so it streams there), one block
    # 0.42 (two in flight plus the outer modules: `block`); Qwen2.5-VL 7B 15.45 bf16, 9.17 with its repeated
    # layers FP8; VAE 0.24. activations and decode: estimates until `python -m bench capped` measures them.
    memory={p: {"denoiser": den, "text_encoders": 15.45, "text_encoders_fp8": 9.17, "vae": 0.24,
                "activations": 1.5, "decode": 3.0, "block": blk}
            for p, den, blk in (("bf16", 38.05, 1.45), ("fp8", 25.4, 0.9), ("int8", 25.4, 0.9))},
    tiny_defaults=Defaults(256, 256, 4, 4.0),
    checkpoint_keys="weights.qwen_image_keys",
    requires_image=True,
)

FAMILY = (
    QwenImageEdit(name="qwen-image-edit", pipeline_class="QwenImageEditPipeline", max_images=1, **_COMMON),
    QwenImageEdit(name="qwen-image-edit-plus", pipeline_class="QwenImageEditPlusPipeline", max_images=3, **_COMMON),
)
