"""weights.pagecache: read-ahead advice for every weights file at the start of Service.load (never a
reason to fail it), and the benchmarks' drop-cache. posix_fadvise itself runs for real; a spy wraps it to
see which files it was given, and a filesystem without it is stood in by a call that raises EINVAL."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import torch
from safetensors.torch import save_file

from app.config import Settings
from app.service import Service
from app.source import resolve
from weights import pagecache


@pytest.fixture
def folder(tmp_path):
    """A diffusers-like folder: two weights files in components, and files that are not weights."""
    for sub in ("transformer", "vae"):
        (tmp_path / sub).mkdir()
        save_file({"w": torch.zeros(4, 4)}, str(tmp_path / sub / "diffusion_pytorch_model.safetensors"))
        (tmp_path / sub / "config.json").write_text("{}")
    (tmp_path / "model_index.json").write_text("{}")
    return tmp_path


def _spy(monkeypatch, fail: bool = False) -> list:
    """Record (file name, advice) of each posix_fadvise; with `fail`, raise EINVAL as a filesystem without it."""
    calls, real = [], os.posix_fadvise

    def spy(fd, offset, length, advice):
        calls.append((os.path.relpath(os.readlink(f"/proc/self/fd/{fd}")), advice))
        if fail:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    return calls


def _join_readahead() -> None:
    for t in threading.enumerate():
        if t.name == "weights-readahead":
            t.join()


def test_weight_files_are_the_safetensors_only(folder):
    assert [p.relative_to(folder).as_posix() for p in pagecache.weight_files(folder)] == [
        "transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    assert pagecache.weight_files("black-forest-labs/FLUX.1-dev") == []  # a hub id: nothing local to read
    assert pagecache.prefetch("tiny-flux") is None


def test_prefetch_advises_willneed_per_file_on_its_own_thread(folder, monkeypatch):
    monkeypatch.chdir(folder)
    calls = _spy(monkeypatch)
    thread = pagecache.prefetch(folder, wait=True)
    assert isinstance(thread, threading.Thread) and thread.daemon and not thread.is_alive()
    assert calls == [(f"{c}/diffusion_pytorch_model.safetensors", os.POSIX_FADV_WILLNEED) for c in ("transformer", "vae")]


def test_no_fadvise_is_no_failure(folder, monkeypatch):
    monkeypatch.delattr(os, "posix_fadvise")  # macOS and other platforms without it
    assert pagecache.advise(pagecache.weight_files(folder), "POSIX_FADV_WILLNEED") == 0
    pagecache.prefetch(folder, wait=True)


def test_service_load_pages_the_model_folder_in_first_and_survives_a_filesystem_without_fadvise(
        folder, monkeypatch, tmp_path_factory, tiny_flux_service):
    """MODEL names the folder (its files are advised); the pipeline is the tiny one (`source`, and the
    shared fixture's loaded pipe as `loader`'s result: the rest of load runs for real). Every advice
    fails with EINVAL: the load does not notice."""
    monkeypatch.chdir(folder)
    calls = _spy(monkeypatch, fail=True)
    out = tmp_path_factory.mktemp("out")
    service = Service.load(Settings(model=str(folder), output_uri=str(out), preflight=False, device="cpu",
                                    warmup=False), source=resolve("tiny-flux", None, True),
                           loader=lambda source, plan, cache_dir: tiny_flux_service.pipe)
    _join_readahead()
    assert [c[0] for c in calls] == ["transformer/diffusion_pytorch_model.safetensors",
                                     "vae/diffusion_pytorch_model.safetensors"]
    assert "weights_ms" in service.cold_start


class _Stop(Exception):
    pass


def test_prefetch_weights_off_reads_nothing(folder, monkeypatch):
    calls = _spy(monkeypatch)

    def loader(source, plan, cache_dir):
        raise _Stop  # past the point where read-ahead would have started: enough of the load

    with pytest.raises(_Stop):
        Service.load(Settings(model=str(folder), prefetch_weights=False, preflight=False, device="cpu",
                              output_uri=str(folder / "out")), source=resolve("tiny-flux", None, True), loader=loader)
    _join_readahead()
    assert calls == []


def test_drop_cache_evicts_each_file(folder, monkeypatch):
    monkeypatch.chdir(folder)
    calls = _spy(monkeypatch)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # as root it would drop the whole machine's page cache
    assert pagecache.drop_cache(folder) == "fsync + posix_fadvise DONTNEED on 2 of 2 files"
    assert {a for _, a in calls} == {os.POSIX_FADV_DONTNEED} and len(calls) == 2
