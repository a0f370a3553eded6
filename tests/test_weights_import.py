"""Import of published FP8 checkpoints: codes kept bit for bit, scales checked, noise refused."""

from __future__ import annotations

import json

import pytest
import torch

from weights.fp8 import FP8Linear, quantize_rows
from tests.weights_fixtures import COMFY, DETECTED, FORMATS, rewrite, tiny_transformer, write
from weights import flux_keys
from weights import manifest as mf
from weights.errors import BadScale, MissingScale, UnknownFormat
from weights.importer import import_checkpoint
from app.families.flux import FAMILY as FLUX
from weights.load import Target, load_denoiser

CPU = Target("cpu", torch.float32)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    model = tiny_transformer()
    cfg = tmp_path_factory.mktemp("cfg") / "config.json"
    cfg.write_text(model.to_json_string())
    return model, cfg


def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 64, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))


def rel_err(model, ref_model) -> float:
    with torch.no_grad():
        ref = ref_model.float()(**inputs()).sample
        ref_model.to(torch.bfloat16)
        out = model(**inputs()).sample.float()
    return ((out - ref).norm() / ref.norm()).item()


def _import(tmp_path, fmt, source, edit=None):
    model, cfg = source
    src = tmp_path / f"{fmt}.safetensors"
    written = write(src, fmt, model)
    if edit:
        rewrite(src, edit)
    out = tmp_path / "imported"
    return import_checkpoint(src, FLUX, out, config=cfg), out, written


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_keeps_codes_and_scales(tmp_path, fmt, source):
    manifest, out, written = _import(tmp_path, fmt, source)
    assert manifest["source"]["format"] == DETECTED[fmt]
    denoiser = load_denoiser(out, mf.read(out), CPU)[0]
    attn = denoiser.transformer_blocks[0].attn
    assert attn.fused_projections and not hasattr(attn, "to_q")
    # Dequantized imported weight == the published codes x scale, exactly (no re-quantization).
    codes, scale = written["double_blocks.0.img_attn.qkv.weight"]
    layer = attn.to_qkv
    assert isinstance(layer, FP8Linear) and layer.weight_scale.shape == (layer.out_features, 1)
    assert torch.equal(layer.weight.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(layer.weight.float() * layer.weight_scale, codes.float() * scale)
    # ... and equals the bf16 source to FP8 rounding (3 mantissa bits: half an ulp is 2^-4 relative).
    src = source[0].state_dict()
    src_qkv = torch.cat([src[f"transformer_blocks.0.attn.to_{p}.weight"] for p in "qkv"]).float()
    deq = layer.weight.float() * layer.weight_scale
    assert ((deq - src_qkv).abs() <= src_qkv.abs() * 2 ** -4 + layer.weight_scale * 2 ** -9 + 1e-6).all()
    assert manifest["recipe"]["kept_bit_for_bit"] == 14 and manifest["recipe"]["requantized_per_row"] == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_imported_forward_matches_source(tmp_path, fmt, source):
    _, out, _ = _import(tmp_path, fmt, source)
    denoiser = load_denoiser(out, mf.read(out), CPU)[0]
    # FP8 weights on a 32-wide model (FP8Linear's CPU path: codes x scale); measured 0.061 per-tensor,
    # 0.036 per-channel scales; the noise control below is 0.55.
    assert rel_err(denoiser, source[0]) < 0.10


def test_modulation_layers_come_back_high_precision(tmp_path, source):
    _, out, written = _import(tmp_path, "comfyui-legacy", source)
    assert "double_blocks.0.img_mod.lin.weight" in written  # the publisher quantized it...
    denoiser = load_denoiser(out, mf.read(out), CPU)[0]
    w = denoiser.transformer_blocks[0].norm1.linear.weight  # ...our skip list dequantizes it
    assert type(w) is torch.nn.Parameter and w.dtype == torch.float32
    codes, scale = written["double_blocks.0.img_mod.lin.weight"]
    assert torch.allclose(w, (codes.float() * scale).to(torch.bfloat16).float())


def test_raw_codes_would_be_noise(source):
    """The control for the bounds above: codes used as numbers (what diffusers does) are noise."""
    model = tiny_transformer()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "blocks" in name:
                p.copy_(p.float().div(p.float().abs().amax() / 448).to(torch.float8_e4m3fn).to(p.dtype))
    # Measured 0.55 on this model (norms absorb part of the 448x blow-up): far outside the 0.10 bound.
    assert rel_err(model.float(), source[0]) > 0.3


@pytest.mark.parametrize("fmt", FORMATS)
def test_stripped_scale_is_refused(tmp_path, fmt, source):
    suffix = "scale_weight" if fmt == "comfyui-legacy" else "weight_scale"
    prefix = COMFY if fmt.startswith("comfyui") else ""
    key = f"{prefix}single_blocks.1.linear2.{suffix}"
    with pytest.raises(MissingScale) as e:
        _import(tmp_path, fmt, source, edit=lambda t, m: t.pop(key))
    assert "single_blocks.1.linear2.weight" in str(e.value) and DETECTED[fmt] in str(e.value)
    assert not (tmp_path / "imported").exists()


def test_file_with_no_scales_at_all_is_refused(tmp_path, source):
    def strip_all(t, m):
        for k in [k for k in t if k.endswith(("weight_scale", "input_scale"))]:
            t.pop(k)
    with pytest.raises(MissingScale, match="codes reach 448 but the file has no scales: a scaled checkpoint whose scales were stripped"):
        _import(tmp_path, "ct-tensor", source, edit=strip_all)


def test_wrong_shaped_scale_is_refused(tmp_path, source):
    key = "double_blocks.0.img_mlp.0.weight_scale"
    with pytest.raises(BadScale, match=r"double_blocks.0.img_mlp.0.weight: scale shape \[3\] does not fit"):
        _import(tmp_path, "ct-channel", source, edit=lambda t, m: t.__setitem__(key, torch.ones(3)))


def test_negative_scale_is_refused(tmp_path, source):
    key = "double_blocks.0.img_mlp.0.weight_scale"
    with pytest.raises(BadScale, match="negative"):
        _import(tmp_path, "ct-tensor", source, edit=lambda t, m: t.__setitem__(key, -t[key]))


def test_non_fp8_comfy_layer_format_is_refused(tmp_path, source):
    key = f"{COMFY}double_blocks.0.img_mlp.0.comfy_quant"
    nvfp4 = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    with pytest.raises(UnknownFormat, match="nvfp4"):
        _import(tmp_path, "comfyui", source, edit=lambda t, m: t.__setitem__(key, nvfp4))


def test_per_block_scales_are_dequantized(tmp_path, source):
    key = "double_blocks.0.img_mlp.0"  # [128, 32] weight, 16x16 blocks -> [8, 2] scale grid
    expected = {}

    def per_block(t, m):
        w = t[f"{key}.weight"].float() * t[f"{key}.weight_scale"]
        scale = w.reshape(8, 16, 2, 16).abs().amax(dim=(1, 3)) / 448
        full = scale.repeat_interleave(16, 0).repeat_interleave(16, 1)
        t[f"{key}.weight"] = (w / full).to(torch.float8_e4m3fn)
        t[f"{key}.weight_scale"] = scale
        expected["w"] = t[f"{key}.weight"].float() * full
    manifest, out, _ = _import(tmp_path, "ct-tensor", source, edit=per_block)
    assert manifest["source"]["scales"]["per-block"] == 1
    assert manifest["recipe"]["kept_bit_for_bit"] == 13 and manifest["recipe"]["requantized_per_row"] == 1
    denoiser = load_denoiser(out, mf.read(out), CPU)[0]
    layer = denoiser.transformer_blocks[0].ff.net[0].proj
    # Per-block is not per-row: codes x block scale (exact, fp32), then re-quantized per row.
    codes, scale = quantize_rows(expected["w"])
    assert isinstance(layer, FP8Linear)
    assert torch.equal(layer.weight.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(layer.weight_scale, scale)
    deq = layer.weight.float() * layer.weight_scale
    assert ((deq - expected["w"]).abs() <= expected["w"].abs() * 2 ** -4 + scale * 2 ** -9).all()


def test_config_is_inferred_for_flux_geometry():

    shapes = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
              "double_blocks.0.img_attn.norm.query_norm.scale": (128,), "double_blocks.18.x.weight": (1,),
              "single_blocks.37.x.weight": (1,), "guidance_in.in_layer.weight": (3072, 256)}
    cfg = flux_keys.infer_config(shapes)
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["num_attention_heads"], cfg["guidance_embeds"]) == (19, 38, 24, True)
    assert cfg["axes_dims_rope"] == [16, 56, 56] and cfg["joint_attention_dim"] == 4096


# ---- Qwen-Image and Wan: the importer through their key modules (families are elsewhere) ----

from dataclasses import dataclass, field  # noqa: E402

from weights.quantize import FUSED, skip_patterns  # noqa: E402


@dataclass
class Spec:
    """The parts of a model family the importer reads (app.families.Family provides them)."""

    name: str
    checkpoint_keys: str
    fuse_qkv: bool
    quant_skip: tuple = ()
    denoiser: str = "transformer"
    vram_gib: dict = field(default_factory=dict)

    def skips(self, module: str) -> bool:
        return skip_patterns(self.quant_skip)(module)


QWEN = Spec("qwen-image", "weights.qwen_image_keys", fuse_qkv=False,  # its processor reads to_q/k/v
            quant_skip=(r"img_in", r"txt_in", r"time_text_embed\..*", r"norm_out\..*", r"proj_out", r".*_mod\.1"))
WAN = Spec("wan", "weights.wan_keys", fuse_qkv=True,
           quant_skip=(r"condition_embedder\..*", r"proj_out", r"patch_embedding"))


def _models():
    from tests.weights_fixtures import tiny_qwen, tiny_wan, wan_original

    return {"qwen": (QWEN, tiny_qwen(), lambda k: k), "wan": (WAN, tiny_wan(), wan_original)}


MODELS = _models()


def _published(tmp_path, which, style, marker=False):
    from tests.weights_fixtures import write_published

    spec, model, original = MODELS[which]
    sd = {original(k): v.detach() for k, v in model.state_dict().items()}
    src = tmp_path / f"{which}-{style}.safetensors"
    written = write_published(src, sd, style, marker)
    cfg = tmp_path / "config.json"
    cfg.write_text(model.to_json_string())
    return src, cfg, written


def _unfused_source(model, name: str) -> torch.Tensor:
    """The source tensor for a loaded name: itself, or the concatenation of a fused projection's parts."""
    sd = model.state_dict()
    if name in sd:
        return sd[name].float()
    layer, _, suffix = name.rpartition(".")
    attn, _, fused = layer.rpartition(".")
    return torch.cat([sd[f"{attn}.{p}.{suffix}"] for p in FUSED[fused]]).float()


@pytest.mark.parametrize("style,marker", [("scaled", False), ("scaled", True), ("plain-cast", False)])
@pytest.mark.parametrize("which", ["qwen", "wan"])
def test_family_import_equals_source_within_fp8_rounding(tmp_path, which, style, marker):
    spec, model, _ = MODELS[which]
    src, cfg, written = _published(tmp_path, which, style, marker)
    out = tmp_path / "imported"
    m = import_checkpoint(src, spec, out, config=cfg)
    assert m["source"]["format"] == ("fp8-unscaled" if style == "plain-cast" else "comfyui-legacy")
    assert m["recipe"]["kept_bit_for_bit"] > 0 and m["recipe"]["requantized_per_row"] == 0
    denoiser = load_denoiser(out, mf.read(out), CPU)[0]
    assert type(denoiser).__name__ == type(model).__name__
    fp8 = {n: mod for n, mod in denoiser.named_modules() if isinstance(mod, FP8Linear)}
    assert len(fp8) == m["recipe"]["quantized_layers"]
    assert any(".to_qkv" in n for n in fp8) == spec.fuse_qkv  # Qwen keeps to_q/k/v apart
    loaded = {**{n: t for n, t in denoiser.state_dict().items() if not n.endswith((".weight_scale",))},
              **{f"{n}.weight": mod.weight.float() * mod.weight_scale for n, mod in fp8.items()}}
    for name, t in loaded.items():
        ref = _unfused_source(model, name)
        err = (t.float() - ref).abs()
        assert (err <= ref.abs() * 2 ** -4 + ref.abs().max() * 2 ** -9 + 2 ** -9).all(), name


@pytest.mark.parametrize("which", ["qwen", "wan"])
def test_family_import_refuses_stripped_scales(tmp_path, which):
    spec, _, _ = MODELS[which]
    src, cfg, _ = _published(tmp_path, which, "stripped")
    with pytest.raises(MissingScale, match="scales were stripped") as e:
        import_checkpoint(src, spec, tmp_path / "imported", config=cfg)
    assert "model.diffusion_model." in str(e.value)  # names the tensor as the file does
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "config.json"])  # nothing left


@pytest.mark.parametrize("which", ["qwen", "wan"])
def test_family_config_is_inferred_from_shapes(which):
    """Shapes of the real geometry (proxies: only the header matters) give the real config."""
    import importlib

    spec, model, original = MODELS[which]
    keys = importlib.import_module(spec.checkpoint_keys)
    shapes = {original(k): tuple(v.shape) for k, v in model.state_dict().items()}
    with pytest.raises(UnknownFormat, match="pass --config"):
        keys.infer_config(shapes)
    wide = {k: tuple(d * 8 if d in (16, 32) else d for d in s) for k, s in shapes.items()}  # head 128, width 256
    cfg = keys.infer_config(wide)
    assert cfg["num_layers"] == 2 and cfg["attention_head_dim"] == 128 and cfg["num_attention_heads"] == 2
    assert cfg["_class_name"] == type(model).__name__


# ---- plain casts vs stripped scales (FLUX: flux1-dev-fp8-e4m3fn is a plain cast) ----

def _flux_published(tmp_path, source, style, edit=None):
    from tests.weights_fixtures import write_published

    model, cfg = source
    bfl = flux_keys.to_bfl({k: v.detach() for k, v in model.state_dict().items()}, dict(model.config))
    src = tmp_path / f"flux-{style}.safetensors"
    written = write_published(src, bfl, style)
    if edit:
        rewrite(src, edit)
    return src, cfg, written


def test_plain_cast_is_accepted_with_scale_one(tmp_path, source):
    src, cfg, written = _flux_published(tmp_path, source, "plain-cast")
    out = tmp_path / "imported"
    m = import_checkpoint(src, FLUX, out, config=cfg)
    assert m["source"]["format"] == "fp8-unscaled" and m["source"]["scales"]["plain-cast"] == len(written) == 16
    assert m["recipe"]["kept_bit_for_bit"] == 14 and m["recipe"]["requantized_per_row"] == 0
    denoiser = load_denoiser(out, mf.read(out), CPU)[0]
    layer = denoiser.transformer_blocks[0].attn.to_qkv
    codes = written["double_blocks.0.img_attn.qkv.weight"][0]
    assert torch.equal(layer.weight.view(torch.uint8), codes.view(torch.uint8)) and (layer.weight_scale == 1).all()
    assert rel_err(denoiser, source[0]) < 0.10


def test_plain_cast_threshold_is_far_from_both_kinds(source):
    """The codes of the tiny model's plain cast stay near its weights (|w| < 2); scaled codes hit 448."""
    from weights.formats import PLAIN_CAST_MAX_CODE

    w = torch.cat([p.detach().float().reshape(-1) for p in source[0].parameters()])
    assert w.abs().max() < PLAIN_CAST_MAX_CODE / 16 and PLAIN_CAST_MAX_CODE * 4 < 448


def test_stripped_scaled_file_is_refused_naming_the_tensor(tmp_path, source):
    src, cfg, _ = _flux_published(tmp_path, source, "stripped")
    with pytest.raises(MissingScale, match=r"model\.diffusion_model\.double_blocks\.0\.\S+: FP8 codes reach 448"):
        import_checkpoint(src, FLUX, tmp_path / "imported", config=cfg)


@pytest.mark.parametrize("where", ["double_blocks.0.txt_mlp.2.weight", "single_blocks.1.linear1.weight"])
def test_mixed_file_plain_cast_with_one_stripped_layer_is_refused(tmp_path, source, where):
    """A plain cast in which one layer was scaled to 448 and lost its scale: that layer is named."""
    key = COMFY + where

    def scaled_one(t, m):
        w = t[key].float()
        t[key] = (w / (w.abs().amax() / 448)).to(torch.float8_e4m3fn)
    src, cfg, _ = _flux_published(tmp_path, source, "plain-cast", scaled_one)
    with pytest.raises(MissingScale, match=f"{key}: FP8 codes reach 448"):
        import_checkpoint(src, FLUX, tmp_path / "imported", config=cfg)
    assert not (tmp_path / "imported").exists()


def test_mixed_file_scaled_with_one_layer_unscaled_is_refused(tmp_path, source):
    """In a scaled file a weight without its scale is refused whatever its codes (no plain-cast guess)."""
    key = f"{COMFY}double_blocks.0.img_mlp.2"

    def unscale(t, m):
        t[f"{key}.weight"] = (t[f"{key}.weight"].float() * t.pop(f"{key}.scale_weight")).to(torch.float8_e4m3fn)
    src, cfg, _ = _flux_published(tmp_path, source, "scaled", unscale)
    with pytest.raises(MissingScale, match=f"{key}.weight: FP8 weight without its scale"):
        import_checkpoint(src, FLUX, tmp_path / "imported", config=cfg)


# ---- every float8 dtype with a rule: decoded by its own format, never used as numbers ----

@pytest.mark.parametrize("dtype,top", [(torch.float8_e5m2, 57344.0), (torch.float8_e4m3fnuz, 240.0),
                                       (torch.float8_e5m2fnuz, 57344.0)])
@pytest.mark.parametrize("scaled", [True, False])
def test_other_float8_dtypes_are_decoded_then_requantized(tmp_path, source, dtype, top, scaled):
    key = "double_blocks.0.img_mlp.0"
    ref = {}

    def recode(t, m):
        w = t[f"{key}.weight"].float() * t[f"{key}.weight_scale"]
        s = w.abs().amax().reshape(1) / top if scaled else torch.ones(1)
        t[f"{key}.weight"] = (w / s).to(dtype)
        ref["w"] = t[f"{key}.weight"].float() * s
        if scaled:
            t[f"{key}.weight_scale"] = s
        else:  # an unscaled file: every layer a plain cast
            for k in [k for k in t if k.endswith("weight_scale")]:
                layer = k.removesuffix("_scale")
                if k != f"{key}.weight_scale":
                    t[layer] = (t[layer].float() * t[k]).to(torch.float8_e4m3fn)
                t.pop(k)
    manifest, out, _ = _import(tmp_path, "ct-tensor", source, edit=recode)
    assert manifest["recipe"]["requantized_per_row"] == 1
    assert manifest["source"]["scales"][f"{str(dtype).removeprefix('torch.')} decoded"] == 1
    layer = load_denoiser(out, mf.read(out), CPU)[0].transformer_blocks[0].ff.net[0].proj
    deq = layer.weight.float() * layer.weight_scale
    assert deq.abs().max() < 3  # codes used as numbers would reach 240..57344
    assert ((deq - ref["w"]).abs() <= ref["w"].abs() * 2 ** -4 + layer.weight_scale * 2 ** -9).all()


# ---- memory: the source is converted a piece at a time, never a layer (or the file) at once ----

@pytest.mark.parametrize("case", ["ct-tensor", "ct-channel", "comfyui", "e5m2-scaled", "e5m2-plain"])
def test_import_holds_one_piece_of_the_source_at_a_time(tmp_path, source, monkeypatch, case):
    """Peak host memory follows the pieces, not the file: with pieces of 64 elements, every tensor read
    from the source during conversion and every re-quantization is at most one piece (a row when a row
    is longer), and the source weights alive at once are at most two pieces."""
    import weakref

    import weights.checkpoint as checkpoint
    import weights.convert as convert

    monkeypatch.setattr(checkpoint, "CHUNK_ELEMENTS", 64)
    reads, live, requantized = [], {"now": 0, "peak": 0}, []
    real_read, real_quantize = checkpoint.CheckpointFile.read, convert.quantize_rows

    def release(n):
        live["now"] -= n

    def read(self, key, lo=0, hi=None):
        t = real_read(self, key, lo, hi)
        n = t.numel() * t.element_size()
        reads.append((key, n, max(64, t[0].numel() if t.dim() else 1) * t.element_size()))
        if key.endswith("scale"):  # kept for the whole import: one number per row, not the weights
            return t
        live["now"] += n
        live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(t, release, n)
        return t

    def quantize(w):
        requantized.append((w.numel(), max(64, w[0].numel())))
        return real_quantize(w)

    def e5m2(t, m, plain=case == "e5m2-plain"):
        for k in [k for k in t if k.endswith("weight_scale")]:
            layer = k.removesuffix("_scale")
            w = t[layer].float() * t.pop(k)
            s = torch.ones(1) if plain else w.abs().amax().reshape(1) / 57344.0
            t[layer] = (w / s).to(torch.float8_e5m2)
            if not plain:
                t[k] = s

    monkeypatch.setattr(checkpoint.CheckpointFile, "read", read)
    monkeypatch.setattr(convert, "quantize_rows", quantize)
    manifest, out, _ = _import(tmp_path, "ct-tensor" if case.startswith("e5m2") else case, source,
                               edit=e5m2 if case.startswith("e5m2") else None)
    assert manifest["recipe"]["quantized_layers"] > 0 and reads
    if case.startswith("e5m2"):
        assert manifest["recipe"]["requantized_per_row"] == manifest["recipe"]["quantized_layers"]
        assert len(requantized) > manifest["recipe"]["quantized_layers"]  # more pieces than layers
    for n, piece in requantized:
        assert n <= piece, (n, piece)
    conversion = [r for r in reads if not r[0].endswith("scale")]
    assert all(n <= piece for _, n, piece in conversion), max(conversion, key=lambda r: r[1] - r[2])
    largest_piece = max(piece for _, _, piece in conversion)
    with checkpoint.CheckpointFile(next(tmp_path.glob("*.safetensors"))) as ckpt:
        largest_layer = max(t.rows * t.row_bytes for t in ckpt.tensors.values())
    assert largest_layer >= 4 * largest_piece  # the pieces are really smaller than a layer here
    # the piece being converted and the one being written; far under the 1.5 layers allowed
    assert live["peak"] <= min(2 * largest_piece, 1.5 * largest_layer), (live["peak"], largest_piece, largest_layer)
