"""The compile cache: its key, its folder and S3 backends with a real torch.compile'd function, every
way a blob can be missing or broken (a compile instead, never a crash), and Service.load's wiring.

torch.compiler.save_cache_artifacts / load_cache_artifacts work on CPU (inductor's C++ backend), so
the round trip is the production one; S3 is moto's server over HTTP (tests/conftest.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from app import compile_cache
from app.compile_cache import cache_key, restore, save
from tests.conftest import captured_logs

BASE = dict(gpu_name="NVIDIA H100 80GB HBM3", capability=(9, 0), model="black-forest-labs/FLUX.1-dev",
            recipe={"fuse_qkv": True, "quantize": "fp8", "attention": "fa3", "compile": "regional"},
            shapes=[(1024, 1024), (1344, 768)])


@pytest.fixture
def logs():
    """Every log line emitted during the test (loguru, as the worker logs)."""
    with captured_logs("DEBUG") as lines:
        yield lines


def _compile_something():
    """Compile and run a tiny function: afterwards torch holds artifacts to save."""
    @torch.compile(fullgraph=True, dynamic=False)
    def f(x):
        return torch.nn.functional.gelu(x * 3.0 + 1.0).sum(dim=-1)

    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return f, x, f(x)


@pytest.fixture(scope="module")
def compiled():
    """Something compiled in this process, once for the module (CPU inductor takes seconds)."""
    return _compile_something()


# ---- the key ----------------------------------------------------------------------------------------

def test_key_is_stable_for_the_same_inputs():
    assert cache_key(**BASE) == cache_key(**dict(BASE, recipe=dict(reversed(list(BASE["recipe"].items())))))
    assert cache_key(**dict(BASE, shapes=tuple(tuple(s) for s in BASE["shapes"]))) == cache_key(**BASE)


@pytest.mark.parametrize("change", [
    dict(gpu_name="NVIDIA H200"),
    dict(capability=(8, 9)),
    dict(model="stabilityai/stable-diffusion-xl-base-1.0"),
    dict(recipe={**BASE["recipe"], "compile": "full"}),
    dict(recipe={**BASE["recipe"], "attention": "cudnn"}),
    dict(shapes=[(1024, 1024)]),
    dict(shapes=[(1344, 768), (1024, 1024)]),  # another warm-up order compiles in another order
])
def test_key_changes_with_anything_the_artifacts_depend_on(change):
    assert cache_key(**dict(BASE, **change)) != cache_key(**BASE)


def test_key_reads_as_arch_and_torch():
    torch_version = torch.__version__.split("+")[0]
    assert cache_key(**BASE).startswith(f"sm90-torch{torch_version}-")
    assert cache_key(**dict(BASE, capability=None)).startswith(f"cpu-torch{torch_version}-")


# ---- restore's refusals -----------------------------------------------------------------------------

def test_no_uri_means_no_cache(tmp_path):
    assert restore(None, "k") is False and restore("", "k") is False
    assert save(None, "k") == 0


def test_folder_without_the_blob(tmp_path, logs):
    assert restore(str(tmp_path), "sm90-x") is False
    assert any("no artifacts for sm90-x" in line for line in logs)


@pytest.mark.parametrize("blob", [b"", b"not torch artifacts", b"\x00" * 64])
def test_a_corrupt_blob_is_ignored(tmp_path, logs, blob):
    (tmp_path / "sm90-bad.bin").write_bytes(blob)
    assert restore(str(tmp_path), "sm90-bad") is False
    assert any("ignoring artifacts for sm90-bad" in line for line in logs)
    assert not any("restored" in line for line in logs)


def test_a_truncated_real_blob_is_ignored(tmp_path, logs, compiled):
    """torch reports a checksum mismatch by logging and returning None, not by raising."""
    assert save(str(tmp_path), "sm90-full") > 0
    blob = (tmp_path / "sm90-full.bin").read_bytes()
    (tmp_path / "sm90-cut.bin").write_bytes(blob[: len(blob) // 2])
    assert restore(str(tmp_path), "sm90-cut") is False
    assert any("ignoring artifacts for sm90-cut" in line for line in logs)


def test_an_unreadable_store_is_ignored(tmp_path, logs):
    (tmp_path / "sm90-dir.bin").mkdir()  # a folder where the blob should be: is_file() is False
    assert restore(str(tmp_path), "sm90-dir") is False
    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert restore(str(blocked / "sub"), "k") is False  # a path under a file: never raises
    assert save(str(blocked / "sub"), "k") == 0
    assert any("could not save k" in line for line in logs)


# ---- round trips ------------------------------------------------------------------------------------

def test_folder_round_trip_fills_a_cold_inductor_cache(tmp_path, monkeypatch, logs):
    """Save after compiling; in a cold state (empty inductor cache dir, dynamo reset) `restore` fills
    the cache, and compiling the same function again is a cache hit instead of a compile."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-a"))
    torch._dynamo.reset()
    _, x, expected = _compile_something()
    store = tmp_path / "store"
    size = save(f"file://{store}", "cpu-k")
    assert size > 0 and (store / "cpu-k.bin").stat().st_size == size
    assert not list(store.glob(".*.tmp"))  # written via a temporary name, then renamed

    cold = tmp_path / "inductor-b"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cold))
    torch._dynamo.reset()
    counters.clear()
    assert restore(str(store), "cpu-k") is True
    assert any(f.is_file() for f in cold.rglob("*")), "restore put nothing into the inductor cache"
    f2, _, _ = _compile_something()
    torch.testing.assert_close(f2(x), expected)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0
    assert any("restored cpu-k" in line for line in logs)


def test_s3_round_trip_and_missing_key(bucket, compiled, logs):
    uri = f"s3://{bucket}/compile-cache"
    size = save(uri, "sm90-s3")
    assert size > 0
    import boto3

    head = boto3.client("s3").head_object(Bucket=bucket, Key="compile-cache/sm90-s3.bin")
    assert head["ContentLength"] == size
    assert restore(uri, "sm90-s3") is True
    assert restore(uri, "sm90-absent") is False
    assert any("no artifacts for sm90-absent" in line for line in logs)


def test_s3_down_is_ignored(s3_env, monkeypatch, logs):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert restore("s3://nowhere/prefix", "sm90-k") is False
    assert any("ignoring artifacts for sm90-k" in line for line in logs)


# ---- Service.load wiring ----------------------------------------------------------------------------

def test_service_does_not_touch_the_cache_when_nothing_is_compiled(tmp_path, logs, compiled):
    """CPU plan -> COMPILE off in the recipe: no restore (a blob sits at the exact key and is not
    read) and no save (torch holds artifacts from `compiled`, yet nothing is written)."""
    from app.config import Settings
    from app.optimize import Recipe
    from app.service import Service
    from app.source import resolve

    settings = Settings(model="tiny-flux", output_uri=str(tmp_path / "out"), preflight=False, device="cpu",
                        compile="regional", compile_cache_uri=str(tmp_path / "cc"), shapes="256x256")
    key = cache_key("cpu", None, resolve("tiny-flux").cache_identity(), Recipe().to_dict(), [(256, 256)])
    (tmp_path / "cc").mkdir()
    (tmp_path / "cc" / f"{key}.bin").write_bytes(b"would be logged as corrupt if read")
    service = Service.load(settings)
    assert service.cold_start["warmup_ms"] > 0  # warm-up ran, which is when a save would happen
    assert os.listdir(tmp_path / "cc") == [f"{key}.bin"]
    assert (tmp_path / "cc" / f"{key}.bin").read_bytes() == b"would be logged as corrupt if read"
    assert not any("compile cache" in line for line in logs)


def test_backend_choice():
    assert isinstance(compile_cache._backend("/data/cc"), compile_cache._Folder)
    assert compile_cache._backend("file:///data/cc").root.as_posix() == "/data/cc"


# ---- another machine's artifacts: another GPU, other versions -------------------------------------------

def _versions(monkeypatch, which: str) -> None:
    """This process as one with another torch, triton or diffusers version (for the key only)."""
    import sys
    import types

    import diffusers

    if which == "torch":
        monkeypatch.setattr(torch, "__version__", "2.99.0+cu999")
    elif which == "diffusers":
        monkeypatch.setattr(diffusers, "__version__", "9.9.9")
    elif which == "triton":
        monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="9.9.9"))


@pytest.mark.parametrize("which", ["torch", "triton", "diffusers"])
def test_key_changes_with_each_version(monkeypatch, which):
    before = cache_key(**BASE)
    with monkeypatch.context() as m:
        _versions(m, which)
        assert cache_key(**BASE) != before
    assert cache_key(**BASE) == before


@pytest.mark.parametrize("other", ["gpu", "torch", "triton", "diffusers"])
def test_artifacts_of_another_gpu_or_versions_are_ignored(tmp_path, monkeypatch, logs, compiled, other):
    """A store holding another machine's blob: this worker's key differs, so the blob is never loaded;
    the miss is logged and warm-up compiles (next test) and saves beside it."""
    store = str(tmp_path / "store")
    theirs = cache_key(**BASE)
    assert save(store, theirs) > 0
    with monkeypatch.context() as m:
        _versions(m, other)
        ours = cache_key(**dict(BASE, gpu_name="NVIDIA H200") if other == "gpu" else BASE)
    assert ours != theirs
    assert restore(store, ours) is False
    assert any(f"no artifacts for {ours} yet" in line for line in logs)
    assert not any("restored" in line for line in logs)


def test_a_miss_compiles_and_saves_under_this_machines_key(tmp_path, monkeypatch, logs):
    """After a miss the compile is a real one (Inductor misses its cache), and its artifacts are saved
    under this machine's key, beside the other machine's blob, which stays as it was."""
    from torch._dynamo.utils import counters

    store = tmp_path / "store"
    store.mkdir()
    theirs, ours = cache_key(**BASE), cache_key(**dict(BASE, gpu_name="NVIDIA H200"))
    (store / f"{theirs}.bin").write_bytes(b"another machine's artifacts")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    counters.clear()
    assert restore(str(store), ours) is False
    _compile_something()
    assert counters["inductor"]["fxgraph_cache_miss"] >= 1 and counters["inductor"]["fxgraph_cache_hit"] == 0
    assert save(str(store), ours) > 0
    assert sorted(p.name for p in store.glob("*.bin")) == sorted([f"{theirs}.bin", f"{ours}.bin"])
    assert (store / f"{theirs}.bin").read_bytes() == b"another machine's artifacts"
