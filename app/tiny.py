"""Parts of the tiny random pipelines built in code: a tokenizer, a CLIP text config, an 8x VAE.

Each family module builds its own tiny pipeline from these (`Family.build_tiny`): the real diffusers
classes and data flow, only narrow and shallow, so a 256x256 image takes well under a second on a
CPU. The weights are random (seeded), so the pictures are noise by design.
"""

from __future__ import annotations

import torch

WORDS = (
    "a an the of on in with and at by for from to photo picture portrait painting drawing render "
    "cat dog bird horse sneaker shoe car house tree flower mountain beach sea sky city street room "
    "red green blue yellow white black orange purple pink gold silver bright dark soft warm cold "
    "studio lighting background product sign says hello world close up wide shot night day sunset "
    "small large old new happy sad cinematic detailed sharp blurry minimal style art"
).split()


def tokenizer(max_length: int):
    """A word-level fast tokenizer over a small fixed vocabulary (no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "</s>"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>", model_max_length=max_length
    )


def clip_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=0, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, hidden_act="gelu", projection_dim=32,
        max_position_embeddings=77,
    )


def vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16, 16, 16),
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=256, **extra,
    )


def eval_mode(pipe):
    """Inference mode for every component: modules built in code start in training mode, where T5's
    dropout (p=0.1) made the same seed give different images. from_pretrained does this itself."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe
