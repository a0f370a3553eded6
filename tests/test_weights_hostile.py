"""Hostile and broken inputs to `weights import` / `weights inspect` / `weights bake`, by defect class.

Every file below is refused with exit 2 and one line naming the file (and the tensor where there is
one), no traceback; `inspect` calls it unusable; nothing is left behind and nothing that was there is
touched. CASES is what docs/reliability.md counts (test_reliability_table_counts_these_cases).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

from tests.weights_fixtures import COMFY, rewrite, rewrite_header, tiny_transformer, write
from weights.__main__ import main

LAYER = "double_blocks.0.img_mlp.0"  # a [128, 32] block linear of the tiny FLUX model


@pytest.fixture(scope="module")
def model():
    return tiny_transformer()


@pytest.fixture(scope="module")
def config(model, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("cfg") / "config.json"
    cfg.write_text(model.to_json_string())
    return cfg


def cli(capsys, *argv) -> tuple[int, str]:
    """(exit status, the one-line refusal) of `python -m weights ...`."""
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    if rc == 0:
        return rc, ""
    assert "Traceback" not in cap.out + cap.err
    if cap.err.strip():
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1, cap.err
        return rc, json.loads(lines[0])["message"]
    report = json.loads(cap.out)
    return rc, report.get("problem", "")


def snapshot(root) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


# ---- scale and code edits (class 3), FP8 dtypes (class 2), duplicates (class 4) ----

def _set(key, value):
    return lambda t, m: t.__setitem__(key, value)


def _scale_edit(fn):
    key = f"{LAYER}.weight_scale"
    return lambda t, m: t.__setitem__(key, fn(t[key]))


def _code_edit(byte, row=5):
    key = f"{LAYER}.weight"

    def edit(t, m):
        b = t[key].view(torch.uint8).clone()
        b[row, 3] = byte
        t[key] = b.view(t[key].dtype)
    return edit


def _recode(dtype, top):
    """LAYER's codes re-encoded in another float8 dtype (scale = amax / that format's max)."""
    key = f"{LAYER}.weight"

    def edit(t, m):
        w = t[key].float() * t[f"{LAYER}.weight_scale"].float()
        s = w.abs().amax().reshape(1) / top
        t[key], t[f"{LAYER}.weight_scale"] = (w / s).to(dtype), s
    return edit


def _relabel(key, dtype):
    def edit(h):
        h[key]["dtype"] = dtype
    return edit


SCALES = {  # ct-channel: one scale per row, so "one row" is expressible
    "zero-whole": _scale_edit(torch.zeros_like),
    "zero-one-row": _scale_edit(lambda s: s.index_fill(0, torch.tensor([7]), 0.0)),
    "negative": _scale_edit(lambda s: -s),
    "nan": _scale_edit(lambda s: s.index_fill(0, torch.tensor([3]), float("nan"))),
    "inf": _scale_edit(lambda s: s.index_fill(0, torch.tensor([3]), float("inf"))),
    "int32-typed": _scale_edit(lambda s: (s * 1e6).to(torch.int32)),
    "fp8-typed": _scale_edit(lambda s: s.to(torch.float8_e4m3fn)),
}
CODES = {  # per-tensor ct file; the byte written into one code
    "e4m3fn-nan-0x7f": ("ct-tensor", _code_edit(0x7F)),
    "e4m3fn-nan-0xff": ("ct-tensor", _code_edit(0xFF)),
    "e5m2-inf": ("ct-tensor", lambda t, m: (_recode(torch.float8_e5m2, 57344.0)(t, m), _code_edit(0x7C)(t, m))),
    "e5m2-nan": ("ct-tensor", lambda t, m: (_recode(torch.float8_e5m2, 57344.0)(t, m), _code_edit(0xFE)(t, m))),
    "e4m3fnuz-nan-0x80": ("ct-tensor", lambda t, m: (_recode(torch.float8_e4m3fnuz, 240.0)(t, m), _code_edit(0x80)(t, m))),
    "bf16-nan": ("ct-tensor", lambda t, m: t.__setitem__("img_in.weight", t["img_in.weight"].index_fill(0, torch.tensor([2]), float("nan")))),
}
DUPLICATES = {
    "comfy-prefix-and-bare": ("comfyui-legacy", lambda t, m: t.__setitem__(f"{LAYER}.weight", t[f"{COMFY}{LAYER}.weight"].clone())),
    "short-prefix-and-bare": ("comfyui-legacy", lambda t, m: t.__setitem__(f"diffusion_model.{LAYER}.bias", t[f"{COMFY}{LAYER}.bias"].clone())),
    "both-prefixes": ("comfyui-legacy", lambda t, m: t.__setitem__(f"diffusion_model.{LAYER}.weight", t[f"{COMFY}{LAYER}.weight"].clone())),
    "duplicated-scale": ("comfyui-legacy", lambda t, m: t.__setitem__(f"{LAYER}.scale_weight", t[f"{COMFY}{LAYER}.scale_weight"].clone())),
}
FLOAT8_REFUSED = {  # header relabels: same bytes, a dtype without a weight rule
    "e8m0fnu": ("F8_E8M0", "float8_e8m0fnu"),
    "float4-packed": ("F4", "F4"),
    "float6": ("F6_E3M2", "F6_E3M2"),
}


def _written(tmp_path, model, fmt, edit=None, header=None):
    src = tmp_path / "src.safetensors"
    write(src, fmt, model)
    if edit:
        rewrite(src, edit)
    if header:
        rewrite_header(src, header)
    return src


def _refused(capsys, tmp_path, src, config, *needles):
    """import and inspect both refuse `src` (exit 2, one line naming file and tensor); nothing left."""
    before = snapshot(tmp_path)
    rc, msg = cli(capsys, "import", src, "--family", "flux", "--out", tmp_path / "out", "--config", config)
    assert rc == 2 and str(src) in msg and all(n in msg for n in needles), msg
    assert snapshot(tmp_path) == before
    rc, problem = cli(capsys, "inspect", src)
    assert rc == 2 and all(n in problem for n in needles), problem
    return msg


@pytest.mark.parametrize("case", sorted(SCALES))
def test_bad_scale_refused(capsys, tmp_path, model, config, case):
    src = _written(tmp_path, model, "ct-channel", SCALES[case])
    _refused(capsys, tmp_path, src, config, f"{LAYER}.weight_scale")


def test_scale_relabelled_f32_to_i32_refused(capsys, tmp_path, model, config):
    src = _written(tmp_path, model, "ct-channel", header=_relabel(f"{LAYER}.weight_scale", "I32"))
    assert "not a float" in _refused(capsys, tmp_path, src, config, f"{LAYER}.weight_scale", "torch.int32")


@pytest.mark.parametrize("case", sorted(CODES))
def test_nan_or_inf_codes_refused(capsys, tmp_path, model, config, case):
    fmt, edit = CODES[case]
    src = _written(tmp_path, model, fmt, edit)
    tensor = "img_in.weight" if case == "bf16-nan" else f"{LAYER}.weight"
    assert "NaN/inf" in _refused(capsys, tmp_path, src, config, tensor)


@pytest.mark.parametrize("case", sorted(DUPLICATES))
def test_duplicate_after_prefix_stripping_refused(capsys, tmp_path, model, config, case):
    fmt, edit = DUPLICATES[case]
    src = _written(tmp_path, model, fmt, edit)
    msg = _refused(capsys, tmp_path, src, config, "same tensor")
    assert msg.count(LAYER) >= 2  # both names


@pytest.mark.parametrize("case", sorted(FLOAT8_REFUSED))
def test_float8_without_a_rule_refused_by_name(capsys, tmp_path, model, config, case):
    label, shown = FLOAT8_REFUSED[case]

    def edit(t, m):
        t[f"{LAYER}.weight"] = t[f"{LAYER}.weight"].view(torch.uint8)
    src = _written(tmp_path, model, "ct-tensor", edit, header=_relabel(f"{LAYER}.weight", label))
    _refused(capsys, tmp_path, src, config, f"{LAYER}.weight", shown)


def test_every_float8_dtype_torch_knows_has_a_rule_or_a_refusal():
    from weights.formats import FP8_RULES, REFUSED_FP8
    from weights.fp8 import FLOAT8

    assert len(FLOAT8) >= 5 and set(FLOAT8) == set(FP8_RULES) | set(REFUSED_FP8)


# ---- structure of the file (class 11) ----

def _truncate(n):
    return lambda p: p.write_bytes(p.read_bytes()[:n(p.read_bytes())])


def _header_len(value):
    return lambda p: p.write_bytes(struct.pack("<Q", value) + p.read_bytes()[8:])


def _swap_shape(h):
    h[f"{LAYER}.weight"]["shape"] = h[f"{LAYER}.weight"]["shape"][::-1]  # same bytes, transposed


def _handmade(path, header: dict, data_bytes: int):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data_bytes))


INSPECT_BLIND = {"header-shape-lies-same-bytes"}  # a consistent file on its own: only the model's config can tell

STRUCTURE = {  # (file edit, words the refusal must hold besides the file name)
    "truncated-data": (_truncate(lambda b: len(b) - 100), ["truncated"]),
    "truncated-header": (_truncate(lambda b: 8 + struct.unpack("<Q", b[:8])[0] // 2), ["header"]),
    "header-only-length": (_truncate(lambda b: 5), ["too short"]),
    "empty-file": (_truncate(lambda b: 0), ["too short"]),
    "empty-header": (lambda p: p.write_bytes(struct.pack("<Q", 0)), ["not valid JSON"]),
    "header-length-1e12": (_header_len(10 ** 12), ["header length 1000000000000"]),
    "header-length-max": (_header_len(2 ** 64 - 1), ["header length"]),
    "header-not-an-object": (lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]"), ["not a JSON object"]),
    "header-no-tensors": (lambda p: p.write_bytes(struct.pack("<Q", 2) + b"{}"), ["no tensors"]),
    "header-shape-strings": (lambda p: rewrite_header(p, lambda h: h[f"{LAYER}.weight"].__setitem__("shape", ["a", 32])),
                             [f"{LAYER}.weight", "non-negative integers"]),
    "header-offsets-past-end": (lambda p: _handmade(p, {f"{LAYER}.weight": {
        "dtype": "F32", "shape": [4], "data_offsets": [1000, 1016]}}, 16), [f"{LAYER}.weight", "truncated"]),
    "header-offsets-overlap": (lambda p: _handmade(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                                      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24),
                               ["overlap"]),
    "header-shape-lies-same-bytes": (lambda p: rewrite_header(p, _swap_shape), [f"{LAYER}.weight", "shape [32, 128]"]),
}


@pytest.mark.parametrize("case", sorted(STRUCTURE))
def test_broken_file_structure_refused(capsys, tmp_path, model, config, case):
    edit, words = STRUCTURE[case]
    src = _written(tmp_path, model, "ct-tensor")
    edit(src)
    before = snapshot(tmp_path)
    commands = [["import", src, "--family", "flux", "--out", tmp_path / "out", "--config", config]]
    commands += [] if case in INSPECT_BLIND else [["inspect", src]]
    for argv in commands:
        rc, msg = cli(capsys, *argv)
        assert rc == 2 and str(src) in msg and all(w in msg for w in words), (argv[0], msg)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["missing", "directory"])
def test_source_path_not_a_file_refused(capsys, tmp_path, case):
    src = tmp_path / "nope.safetensors"
    if case == "directory":
        src.mkdir()
    for argv in (["import", src, "--family", "flux", "--out", tmp_path / "out"], ["inspect", src]):
        rc, msg = cli(capsys, *argv)
        if case == "directory" and argv[0] == "inspect":
            assert rc == 2 and "manifest.json" in msg  # a folder is read as a baked directory
        else:
            assert rc == 2 and str(src) in msg and ("no such file" in msg or "not a file" in msg), msg
    assert not (tmp_path / "out").exists()


GEOMETRY = {  # the config says one model, the file holds another
    "in-channels-fill-like": {"in_channels": 24},
    "joint-attention-dim": {"joint_attention_dim": 48},
    "more-layers": {"num_single_layers": 3},
    "fewer-layers": {"num_single_layers": 1},
    "other-class": {"_class_name": "WanTransformer3DModel"},
}


@pytest.mark.parametrize("case", sorted(GEOMETRY))
def test_geometry_differing_from_the_config_refused(capsys, tmp_path, model, case):
    src = _written(tmp_path, model, "ct-tensor")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**json.loads(model.to_json_string()), **GEOMETRY[case]}))
    before = snapshot(tmp_path)
    rc, msg = cli(capsys, "import", src, "--family", "flux", "--out", tmp_path / "out", "--config", cfg)
    assert rc == 2 and msg and snapshot(tmp_path) == before, msg
    if case != "other-class":
        assert str(src) in msg


def test_fill_like_file_imports_with_its_inferred_geometry(tmp_path):
    """A wider x_embedder than FLUX.1-dev's (FLUX Fill: 384 input channels) is read from the shapes."""
    from weights import flux_keys

    shapes = {"img_in.weight": (3072, 384), "txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
              "double_blocks.0.img_attn.norm.query_norm.scale": (128,), "double_blocks.18.x": (1,),
              "single_blocks.37.x": (1,), "guidance_in.in_layer.weight": (3072, 256)}
    assert flux_keys.infer_config(shapes)["in_channels"] == 384


# ---- --out (class 1) and leftovers (class 12) ----

def _foreign(out):
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")


def _bake_plus_foreign_file(out, baked):
    import shutil
    shutil.copytree(baked, out)
    (out / "transformer" / "my-lora.safetensors").write_bytes(b"lora")


def _bake_plus_empty_dir(out, baked):
    import shutil
    shutil.copytree(baked, out)
    (out / "extra").mkdir()


def _bake_plus_symlink(out, baked):
    import shutil
    shutil.copytree(baked, out)
    (out / "link").symlink_to(out.parent / "elsewhere.txt")


def _symlink_to_bake(out, baked):
    import shutil
    real = out.parent / "real-bake"
    shutil.copytree(baked, real)
    out.symlink_to(real)


def _symlink_to_folder(out, baked):
    _foreign(out.parent / "real")
    out.symlink_to(out.parent / "real")


def _a_file(out, baked):
    out.write_text("not a folder")


def _foreign_manifest(out, baked):
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "someone-else", "files": {}}))


OUT_FOLDERS = {
    "other-files": lambda out, baked: _foreign(out),
    "bake-plus-foreign-file": _bake_plus_foreign_file,
    "bake-plus-empty-dir": _bake_plus_empty_dir,
    "bake-plus-symlink": _bake_plus_symlink,
    "symlink-to-a-bake": _symlink_to_bake,
    "symlink-to-a-folder": _symlink_to_folder,
    "a-file": _a_file,
    "someone-elses-manifest": _foreign_manifest,
}


@pytest.fixture(scope="module")
def baked(model, config, tmp_path_factory):
    from app.families.flux import FAMILY as FLUX
    from weights.importer import import_checkpoint

    root = tmp_path_factory.mktemp("prev")
    write(root / "src.safetensors", "ct-tensor", model)
    import_checkpoint(root / "src.safetensors", FLUX, root / "bake", config=config)
    return root / "bake"


@pytest.mark.parametrize("command", ["import", "bake"])
@pytest.mark.parametrize("case", sorted(OUT_FOLDERS))
def test_out_that_is_not_ours_survives_byte_for_byte(capsys, tmp_path, model, config, baked, case, command):
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    (out.parent / "elsewhere.txt").write_text("target")
    OUT_FOLDERS[case](out, baked)
    src = tmp_path / "src.safetensors"
    write(src, "ct-tensor", model)
    before = snapshot(out.parent)
    argv = (["import", src, "--family", "flux", "--config", config] if command == "import"
            else ["bake", "--model", "tiny-flux", "--device", "cpu"])
    rc, msg = cli(capsys, *argv, "--out", out)
    assert rc == 2 and str(out) in msg and "nothing else is ever deleted" in msg, msg
    assert snapshot(out.parent) == before


def test_previous_bake_is_replaced_and_nothing_else_touched(capsys, tmp_path, model, config, baked):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(baked, out)
    (tmp_path / "neighbour.txt").write_text("stays")
    old = json.loads((out / "manifest.json").read_text())
    src = tmp_path / "src2.safetensors"
    write(src, "ct-channel", model)
    rc, _ = cli(capsys, "import", src, "--family", "flux", "--config", config, "--out", out)
    assert rc == 0
    new = json.loads((out / "manifest.json").read_text())
    assert new["source"]["id"] == "src2.safetensors" != old["source"]["id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neighbour.txt", "out", "src2.safetensors"]
    assert (tmp_path / "neighbour.txt").read_text() == "stays"


def test_bake_into_previous_bake_and_into_new_nested_folder(tmp_path):
    """`bake` twice into the same --out (the second swaps the first out), and into a/b/c that did not exist."""
    from weights.__main__ import bake

    out = tmp_path / "a" / "b" / "c"
    bake("tiny-flux", out, "bf16", device="cpu")
    first = (out / "manifest.json").read_text()
    bake("tiny-flux", out, "fp8", device="cpu")
    assert json.loads((out / "manifest.json").read_text())["recipe"]["precision"] == "fp8" and first
    assert sorted(p.name for p in out.parent.iterdir()) == ["c"]


@pytest.mark.parametrize("existing", ["absent", "nested-absent", "previous-bake"])
def test_failure_while_writing_leaves_nothing_and_keeps_the_old_bake(tmp_path, model, config, baked, monkeypatch, existing):
    """The disk filling up during the write (simulated: no way to fill a disk here, so the manifest write
    raises ENOSPC) removes the temporary sibling and any folder the run made; an old bake is untouched."""
    import errno
    import shutil

    from app.families.flux import FAMILY as FLUX
    from weights import manifest as mf
    from weights.importer import import_checkpoint

    src = tmp_path / "src.safetensors"
    write(src, "ct-tensor", model)
    out = tmp_path / ("x/y/out" if existing == "nested-absent" else "out")
    if existing == "previous-bake":
        shutil.copytree(baked, out)
    before = snapshot(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(mf, "write", full)
    with pytest.raises(OSError):
        import_checkpoint(src, FLUX, out, config=config)
    assert snapshot(tmp_path) == before


# ---- the counts docs/reliability.md reports ----

CASES = {
    "scale: zero, negative, NaN/inf, integer- or FP8-typed": len(SCALES) + 1,
    "codes: FP8 NaN/inf encodings, NaN in bf16": len(CODES),
    "float8 dtype without a rule (e8m0, fp4, fp6)": len(FLOAT8_REFUSED),
    "duplicate after prefix stripping": len(DUPLICATES),
    "file structure (truncated, header length/JSON/shape/offsets)": len(STRUCTURE) + 2,
    "geometry differing from the config": len(GEOMETRY),
    "`--out` not ours (import and bake)": 2 * len(OUT_FOLDERS),
}


def test_reliability_table_counts_these_cases():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    for what, n in CASES.items():
        assert f"| {what} | {n} |" in text, what
