"""weights.reader: chunked parallel reads give safetensors' exact tensors, and bad files name themselves.

The CPU runs the same staged code the GPU does (staging buffer per thread, a copy per tensor a chunk
overlaps); only the pinning, the CUDA streams and the asynchronous copies are GPU-only.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from weights.errors import IntegrityError
from weights.reader import ShardReader, read_shards

from tests.weights_fixtures import rewrite_header

STATE = {
    "fp8": torch.randn(33, 17).to(torch.float8_e4m3fn),
    "bf16": torch.randn(5, 7, dtype=torch.bfloat16),
    "scale": torch.rand(33, 1),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
    "i64": torch.arange(9),
    "flag": torch.tensor([True, False, True]),
}


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "s.safetensors"
    save_file(STATE, str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("chunk", [1, 3, 64, 1000, 1 << 20])
@pytest.mark.parametrize("threads", [1, 4])
def test_reader_equals_safetensors_byte_for_byte(shard, chunk, threads):
    # chunk 1 and 3: every tensor is split across many reads and threads, on unaligned boundaries.
    (name, tensors, metadata), = read_shards([shard], "cpu", threads=threads, chunk=chunk)
    ref = load_file(str(shard))
    assert metadata == {"format": "pt"} and name == str(shard)
    assert sorted(tensors) == sorted(ref)
    for k, t in ref.items():
        got = tensors[k]
        assert (got.dtype, got.shape) == (t.dtype, t.shape), k
        assert torch.equal(raw(got), raw(t)), k


def test_every_tensor_owns_its_storage(shard):
    # Parameters that were views of one shared buffer would alias each other for torch.compile.
    (_, tensors, _), = read_shards([shard], "cpu", chunk=8)
    ptrs = [t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()]
    assert len(set(ptrs)) == len(ptrs)
    assert all(t.storage_offset() == 0 for t in tensors.values())


def test_one_reader_serves_many_shards_in_order(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.safetensors")
        save_file({f"w{i}": torch.full((100,), float(i))}, str(paths[-1]))
    out = list(read_shards(paths, "cpu", names=["a", "b", "c"], chunk=64))
    assert [n for n, _, _ in out] == ["a", "b", "c"]
    assert [float(t[f"w{i}"][0]) for i, (_, t, _) in enumerate(out)] == [0.0, 1.0, 2.0]


def test_truncated_file_names_the_tensor_and_the_file(shard):
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match=r"s\.safetensors: tensor \w+ ends at byte .*truncated"):
        list(read_shards([shard], "cpu"))


def test_header_cut_short_is_refused(shard):
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(IntegrityError, match="header length .* exceeds the file"):
        list(read_shards([shard], "cpu"))


def test_a_huge_declared_header_is_refused_without_reading_it(shard):
    data = shard.read_bytes()
    shard.write_bytes((1 << 40).to_bytes(8, "little") + data[8:])
    with pytest.raises(IntegrityError, match="header length 1099511627776 exceeds the file"):
        list(read_shards([shard], "cpu"))


def test_shape_that_disagrees_with_the_byte_range_is_refused(shard):
    rewrite_header(shard, lambda h: h["fp8"].update(shape=[34, 17]))
    with pytest.raises(IntegrityError, match=r"tensor fp8 spans bytes .* shape \[34, 17\]"):
        list(read_shards([shard], "cpu"))


def test_overlapping_tensors_are_refused(shard):
    def overlap(header):
        begin = header["fp8"]["data_offsets"][0]
        header["bf16"]["data_offsets"] = [begin, begin + 70]  # 5 x 7 bf16 inside the fp8 tensor's bytes

    rewrite_header(shard, overlap)
    with pytest.raises(IntegrityError, match="overlap"):
        list(read_shards([shard], "cpu"))


def test_unknown_dtype_is_refused(shard):
    rewrite_header(shard, lambda h: h["i64"].update(dtype="C64"))
    with pytest.raises(IntegrityError, match="tensor i64 has unsupported dtype C64"):
        list(read_shards([shard], "cpu"))


def test_reader_closes_its_threads(shard):
    reader = ShardReader("cpu", threads=2)
    with reader:
        reader.read(shard)
    with pytest.raises(RuntimeError):
        reader._pool.submit(print)


def test_a_failing_span_stops_the_read_and_nothing_runs_after_it(shard):
    # A remote source's checked chunk fails: the error reaches the caller, queued spans are cancelled,
    # and no span is still writing into buffers (or reading a closed descriptor) once it has.
    import time

    data = shard.read_bytes()
    calls = []

    def fill(i, lo, view):
        calls.append(i)
        if i == 3:
            raise IntegrityError("chunk 3 altered")
        time.sleep(0.01)
        view[:] = data[lo:lo + len(view)]

    with ShardReader("cpu", threads=2, chunk=8) as reader:
        with pytest.raises(IntegrityError, match="chunk 3 altered"):
            reader.read_from(fill, len(data), data, "remote")
        seen = len(calls)
        time.sleep(0.1)
        assert len(calls) == seen < -(-len(data) // 8)
