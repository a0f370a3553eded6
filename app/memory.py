"""Apply the memory plan preflight chose (preflight.memory) to a loaded pipeline.

  load_device     where the loader puts the weights: the plan's device when resident, else host memory
                  (a 24 GB card cannot hold the whole pipeline even for a moment)
  place           after loading: FP8 text encoders when TEXT_ENCODERS=fp8; the text encoders stream
                  from pinned host memory through the GPU leaf by leaf (diffusers' group offloading,
                  a CUDA stream prefetching the next leaf) under offload-text/offload-blocks; the VAE
                  goes to the GPU; VAE tiling when planned
  adjust_recipe   offload-blocks: compile and CUDA graphs off (below)
  finish          after the recipe, so the denoiser is fused and quantized in host memory first (a bf16
                  FLUX transformer and its QKV fusion's copies do not fit a 24 GB card; compile is lazy):
                  offload-text moves it to the GPU; offload-blocks streams its blocks (`block_level`,
                  one block per group, `use_stream=True`); every denoiser the pipeline holds alike
                  (Wan 2.2 A14B's two experts: only the running one's blocks are on the GPU)

Streaming changes where weights wait, not what runs: the same kernels see the same tensors, so an
offloaded job gives the bytes a resident one gives. FP8Linear keeps its codes and scales as buffers,
which group offloading moves like parameters (its `.data` swap never calls `_apply`, so nothing is cast).
Compile and group offloading: the offload hooks run inside each block's forward (stream waits, `.data`
swaps, marked `torch.compiler.disable`), which breaks a fullgraph regional compile; CUDA graphs would
capture the copies. So offload-blocks runs the denoiser eager; offload-text keeps both (the denoiser is
untouched). On a CPU the hooks run without a stream (host to host: a no-op move), which is what the
tests exercise.
"""

from __future__ import annotations

from dataclasses import replace

from loguru import logger

TILE_PX = 512  # VAE tile side under the tiling plan: the VAEs' own sample_size (1024) would not tile 1024 px


def text_encoders(pipe) -> dict:
    """The pipeline's text encoder modules by component name (diffusers names them text_encoder*)."""
    from weights.text_fp8 import text_encoders as found

    return found(pipe)


def load_device(plan) -> str:
    """Where the loader puts every component before `place`: the GPU only when all of it stays there."""
    return plan.device if plan.memory == "resident" else "cpu"


def _offload(module, device: str, offload_type: str) -> None:
    from diffusers.hooks import apply_group_offloading

    cuda = device.startswith("cuda")
    kw = dict(num_blocks_per_group=1) if offload_type == "block_level" else {}
    apply_group_offloading(module, onload_device=device, offload_device="cpu", offload_type=offload_type,
                           use_stream=cuda, **kw)


def place(pipe, family, plan) -> dict:
    """Put a pipeline loaded on `load_device(plan)` where the plan wants each component; what was done."""
    import torch

    from weights.quantize import quantize_text_encoder

    device = "cuda:0" if plan.device == "cuda" else plan.device
    done = {"memory": plan.memory}
    encoders = text_encoders(pipe)
    if plan.text_encoders == "fp8":
        done["text_encoders_fp8"] = {n: len(quantize_text_encoder(m, "fp8")) for n, m in encoders.items()}
    if plan.memory != "resident":
        later = set(encoders) | set(family.denoisers_of(pipe))  # the encoders stream; denoisers wait for `finish`
        for name, module in pipe.components.items():
            if name not in later and isinstance(module, torch.nn.Module):
                module.to(device)
        for module in encoders.values():
            _offload(module, device, "leaf_level")
        done["streamed"] = sorted(encoders)
    elif plan.text_encoders == "fp8":
        for module in encoders.values():
            module.to(device)
    if plan.vae_tiling and hasattr(pipe, "vae"):
        vae = pipe.vae
        vae.enable_tiling()
        if hasattr(vae, "tile_sample_min_size"):
            vae.tile_sample_min_size = TILE_PX
            vae.tile_latent_min_size = TILE_PX // pipe.vae_scale_factor
        done["vae_tiling"] = TILE_PX
    logger.info("memory plan applied: {}", done)
    return done


def adjust_recipe(recipe, plan):
    """The recipe a streamed denoiser can run: eager, no CUDA graphs (see the module docstring)."""
    if plan.memory != "offload-blocks" or (recipe.compile == "off" and not recipe.cuda_graphs):
        return recipe
    logger.info("memory plan offload-blocks: compile and CUDA graphs off (the offload hooks break both)")
    return replace(recipe, compile="off", cuda_graphs=False)


def finish(pipe, family, plan) -> str:
    """Put the (fused, quantized) denoisers where the plan wants them (every one the pipeline holds:
    Wan 2.2's two experts alike, each used for its share of the steps); where they went."""
    if plan.memory == "resident":
        return "resident"
    device = "cuda:0" if plan.device == "cuda" else plan.device
    denoisers = family.denoisers_of(pipe)
    if plan.memory == "offload-text":
        for denoiser in denoisers.values():
            denoiser.to(device)
        return device
    for denoiser in denoisers.values():
        _offload(denoiser, device, "block_level")
    logger.info("memory plan offload-blocks: {} stream one block at a time", ", ".join(denoisers))
    return "streamed"
