"""Bake, load, stream, import, inspect and verify pre-quantized denoiser weights.

A *baked directory* is a diffusers pipeline directory whose denoiser is stored already quantized
(FP8 per-row by default, QKV fused: the plain tensors of `weights.fp8.FP8Linear`, e4m3 `weight` + fp32
`weight_scale`), plus a `manifest.json` with the recipe, versions and the size and sha256 of every
file. `python -m weights --help` lists the commands; `weights.load.load_baked(path, plan)` is what
the worker calls.
"""
