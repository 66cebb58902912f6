"""The executor's mechanisms: gather/scale recipes, row-blocked arithmetic, zero-sum noise, exact element-wise
splits, the streaming writer."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

import grow.plan as plan
from grow.plan import AxisMap, Init, Noise, Split, TensorRecipe, materialize, split_pieces
from grow.writer import BLOCK, WRITE_CHUNK, ShardedWriter, StreamFile, parse_size

pytestmark = pytest.mark.no_transformers  # see tests/conftest.py


def _recipe(**kw):
    index0 = torch.tensor([2, 0, 1, -1, 2, 0])
    index1 = torch.arange(5).repeat(2)
    base = dict(name="w", shape=(6, 10), dtype="F32", sources=("src",),
                axes=(AxisMap(index0, torch.linspace(0.5, 2.0, 6)), AxisMap(index1, torch.full((10,), 0.5))),
                scale=3.0, init=Init("normal", 0.01), seed=7)
    base.update(kw)
    return TensorRecipe(**base)


SRC = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


def test_gather_and_scale_match_the_direct_formula():
    r = _recipe(axes=(AxisMap(torch.tensor([2, 0, 1, 1, 2, 0]), torch.linspace(0.5, 2.0, 6)),
                      AxisMap(torch.arange(5).repeat(2), torch.full((10,), 0.5))))
    out = materialize(r, {"src": SRC}.__getitem__)
    want = SRC.float()[[2, 0, 1, 1, 2, 0]][:, list(range(5)) * 2] * torch.linspace(0.5, 2.0, 6)[:, None] * 0.5 * 3.0
    assert torch.equal(out, want)
    assert SRC.dtype == torch.bfloat16  # the source tensor is never written into


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_row_blocks_give_the_same_tensor(monkeypatch, dtype):
    r = _recipe(dtype=dtype, init=Init("zeros"))
    whole = materialize(r, {"src": SRC}.__getitem__)
    monkeypatch.setattr(plan, "WORK_ELEMENTS", 10)  # one row per block
    blocked = materialize(r, {"src": SRC}.__getitem__)
    assert torch.equal(whole, blocked)
    assert torch.all(whole[3] == 0)  # the new row


def test_new_positions_are_filled_from_init():
    out = materialize(_recipe(init=Init("ones")), {"src": SRC}.__getitem__)
    assert torch.all(out[3] == 1)
    assert not torch.any(out[[0, 1, 2, 4, 5]] == 1)


@pytest.mark.parametrize("axis", [0, 1])
def test_noise_sums_to_zero_within_groups_and_hits_the_snr(axis):
    groups = torch.arange(200).repeat(2) if axis == 1 else torch.arange(100).repeat(2)
    shape = (100, 400) if axis == 1 else (200, 200)
    index = [None, None]
    index[axis] = AxisMap(groups)
    src = torch.randn(100, 200, generator=torch.Generator().manual_seed(1))
    r = TensorRecipe("n", shape, "F32", ("s",), axes=tuple(index), noise=Noise(axis, groups, 20.0), seed=3)
    out = materialize(r, {"s": src}.__getitem__)
    clean = src.index_select(axis, groups)
    noise = (out - clean).movedim(axis, 0)
    pairs = noise[: groups.numel() // 2] + noise[groups.numel() // 2:]
    assert pairs.abs().max() < 1e-5  # the two copies of each input cancel
    snr = 10 * torch.log10(clean.pow(2).mean() / noise.pow(2).mean())
    assert abs(snr.item() - 20.0) < 0.5


def test_generated_tensor_with_shared_rows():
    r = TensorRecipe("router", (4, 6), "F32", base_shape=(2, 6), axes=(AxisMap(torch.tensor([0, 0, 1, 1])), None),
                     init=Init("normal", 0.02), seed=1)
    out = materialize(r, {}.__getitem__)
    assert torch.equal(out[0], out[1]) and torch.equal(out[2], out[3]) and not torch.equal(out[0], out[2])


def test_writer_streams_shards_that_read_back(tmp_path):
    tensors = {f"t{i}": torch.randn(50, 40 + i).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(6)}
    layout = [(k, "BF16" if v.dtype == torch.bfloat16 else "F32", tuple(v.shape)) for k, v in tensors.items()]
    w = ShardedWriter(tmp_path, layout, max_shard_bytes=20_000)
    for k, v in tensors.items():
        w.write(k, v)
    names = w.close()
    assert len(names) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    for k, v in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][k]), "pt") as f:
            assert torch.equal(f.get_tensor(k), v)
            assert f.metadata() == {"format": "pt"}


def _has_o_direct(folder) -> bool:
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        return True
    except (OSError, AttributeError):
        return False


@pytest.mark.parametrize("direct", [True, False])
def test_stream_file_writes_every_byte(tmp_path, direct):
    """Pieces that cross the staging buffer and the 4 kB blocks in every way, and a tail that is not a
    whole block (padded for O_DIRECT, then cut back): the file holds exactly the bytes written."""
    gen = np.random.default_rng(0)
    sizes = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, WRITE_CHUNK - 3, 7, WRITE_CHUNK, 2 * WRITE_CHUNK + 5, 100]
    pieces = [gen.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    f = StreamFile(tmp_path / "out.bin", direct)
    for p in pieces:
        f.write(p)
    f.close()
    assert f.direct == (direct and _has_o_direct(tmp_path))  # O_DIRECT where the filesystem has it
    assert (tmp_path / "out.bin").read_bytes() == np.concatenate(pieces).tobytes()


def test_data_placed_like_its_file_offset_is_written_where_it_lies(tmp_path, monkeypatch):
    """A piece whose address is as far past a block boundary as its file offset (grow's output buffers,
    placed by the recycler) goes to disk from its own memory, all but its partial first and last
    blocks; one placed otherwise goes through staging. The file holds every byte either way."""
    from grow import writer

    if not _has_o_direct(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    writes, write_all = [], writer._write_all  # (address, length) of every write
    monkeypatch.setattr(writer, "_write_all", lambda fd, data: writes.append((data.ctypes.data, len(data)))
                        or write_all(fd, data))
    pool = plan.Recycler(align=BLOCK)
    gen = np.random.default_rng(1)
    pieces = [gen.integers(0, 256, 1000, dtype=np.uint8)]
    f = StreamFile(tmp_path / "out.bin")
    f.write(pieces[0])
    placed = []
    for phase in (1000, 7):  # the file offset's phase, then another
        pool.phase = phase
        t = pool.empty((WRITE_CHUNK + BLOCK + 1,), torch.uint8)
        assert t.data_ptr() % BLOCK == phase
        t.copy_(torch.from_numpy(gen.integers(0, 256, t.numel(), dtype=np.uint8)))
        pieces.append(t.numpy().copy())
        placed.append(t.data_ptr())
        f.write(t.numpy())
    f.close()
    assert (tmp_path / "out.bin").read_bytes() == np.concatenate(pieces).tobytes()
    first, second = placed
    assert (first + BLOCK - 1000, WRITE_CHUNK) in writes  # from where it lies, from the next block on
    assert not any(second <= at < second + WRITE_CHUNK + BLOCK for at, _ in writes)  # staged


def test_direct_writes_a_filesystem_refuses_go_through_the_page_cache(tmp_path):
    """An O_DIRECT write the filesystem refuses (here: a buffer not aligned to a block) is made through
    the page cache instead, and the file holds every byte."""
    from grow.writer import _write_all

    if not _has_o_direct(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    data = np.arange(3 * BLOCK + 1, dtype=np.uint8)
    fd = os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    try:
        _write_all(fd, data[1:])  # neither the address nor the length is aligned
    finally:
        os.close(fd)
    assert (tmp_path / "out.bin").read_bytes() == data[1:].tobytes()


def test_writer_refuses_out_of_order_tensors(tmp_path):
    w = ShardedWriter(tmp_path, [("a", "F32", (2,)), ("b", "F32", (2,))], None)
    with pytest.raises(RuntimeError):
        w.write("b", torch.zeros(2))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("2GiB") == 2 * 2**30


@pytest.mark.parametrize("scale", [0.5, 1 / 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_copy_rounds_once(scale, dtype):
    """Power-of-two scales take the native-dtype path, others the float32 path: both give the
    float32 result rounded once."""
    src = (torch.randn(64, 48, generator=torch.Generator().manual_seed(2)) * 0.05).to(dtype)
    name = "BF16" if dtype == torch.bfloat16 else "F16"
    r = TensorRecipe("w", (64, 96), name, ("s",), axes=(None, AxisMap(torch.arange(48).repeat(2), torch.full((96,), scale))))
    out = materialize(r, {"s": src}.__getitem__)
    want = (src.float().repeat(1, 2) * torch.tensor(scale, dtype=torch.float32)).to(dtype)
    assert out.dtype == dtype and torch.equal(out, want)


def test_source_reads_every_dtype_exactly(tmp_path):
    from safetensors.torch import save_file

    from grow.checkpoint import Source

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen),
        "bf16": torch.randn(7, 2, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(4, generator=gen).to(torch.float16),
        "i64": torch.arange(6).reshape(2, 3),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    source = Source(tmp_path)
    for k, v in tensors.items():
        got = source.get(k)
        assert got.dtype == v.dtype and torch.equal(got, v)
    source.close()


def _split_both_ways(w: torch.Tensor, copies: int, dtype, axis: int, tiled: bool):
    """w's columns (rows with axis 0) repeated `copies` times plus one position in no group, split by the
    general path (split_pieces, float32 out) or by materialize (the tiled path: one copy gathered, the
    pieces written straight into the output dtype by two threads)."""
    index = torch.cat([torch.arange(w.shape[1]).repeat(copies), torch.tensor([0])])
    groups = torch.cat([torch.arange(w.shape[1]).repeat(copies), torch.tensor([-1])])
    split = Split(axis, groups, 10.0)
    if not tiled:
        return split_pieces(w[:, index].clone(), split, dtype, torch.Generator().manual_seed(1))
    assert plan.tiles(groups) == (0, w.shape[1], copies)
    src = w.to(dtype) if axis == 1 else w.T.contiguous().to(dtype)
    shape = (w.shape[0], index.numel()) if axis == 1 else (index.numel(), w.shape[0])
    axes = (None, AxisMap(index)) if axis == 1 else (AxisMap(index), None)
    name = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    out = materialize(TensorRecipe("w", shape, name, ("s",), axes=axes, split=split, seed=1), {"s": src}.__getitem__)
    assert out.dtype == dtype and out.shape == shape
    return out.float() if axis == 1 else out.float().T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("copies", [2, 3])
@pytest.mark.parametrize("axis,tiled", [(1, False), (1, True), (0, True)])
def test_split_pieces_sum_exactly_in_the_output_dtype(monkeypatch, dtype, copies, axis, tiled):
    """Every piece is representable and the pieces of a group add up to the value bit for bit, over
    magnitudes from subnormal-adjacent to large; a position in no group keeps its value."""
    monkeypatch.setattr(plan, "SPLIT_BLOCK", 64)  # several blocks, shared by the threads
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(32, 40, generator=gen) * torch.logspace(-7, 3, 40)).to(dtype).float()
    w[0, 0] = 0.0
    w[1, 1] = torch.finfo(dtype).tiny * 0.5 if dtype != torch.float32 else 2.0 ** -140  # a subnormal
    pieces = _split_both_ways(w, copies, dtype, axis, tiled)
    assert torch.equal(pieces.to(dtype).float(), pieces)
    total = sum(pieces[:, c * 40:(c + 1) * 40] for c in range(copies))
    assert torch.equal(total, w)
    assert torch.equal(pieces[:, -1], w[:, 0])
    assert not torch.equal(pieces[:, :40], pieces[:, 40:80])  # the copies differ
    share = pieces[:, :40] / w.where(w != 0, torch.ones(()))
    assert share.min() >= 0 and share.max() <= 1  # each piece has W's sign and at most its magnitude


@pytest.mark.parametrize("copies", [2, 3])
def test_split_noise_has_the_asked_snr(copies):
    """Each piece is its share 1/m of the value plus noise 10 dB below that share (std 1/sqrt(10) of it)."""
    w = torch.ones(400, 500)
    pieces = _split_both_ways(w, copies, torch.float32, 1, True)[:, :500]
    relative = pieces * copies - 1  # noise over the share
    assert abs(relative.mean().item()) < 0.01
    assert relative.std().item() == pytest.approx(10 ** -0.5, rel=0.03)


def test_tiled_split_does_not_depend_on_the_threads(monkeypatch):
    monkeypatch.setattr(plan, "SPLIT_BLOCK", 50)
    w = torch.randn(64, 30, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    outs = []
    for workers in (1, 2):
        out = torch.empty(64, 60, dtype=torch.bfloat16)
        plan.split_tiles_([(w, [out[:, :30], out[:, 30:]], 5)], 10.0, workers=workers)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :30].float() + outs[0][:, 30:].float(), w.float())
    assert plan.tiles(torch.tensor([0, 1, 1, 0])) is None and plan.tiles(torch.tensor([0, 1, -1, 0, 1])) is None


def test_tiled_split_of_tiled_rows_draws_each_copy_of_a_row_afresh():
    """HyperCloning's Linear: rows tiled, columns split; the rows are written run by run from the source
    rows (no gathered copy), and the two copies of a row get different pieces."""
    w = torch.randn(32, 40, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    groups = torch.arange(40).repeat(2)
    r = TensorRecipe("w", (64, 80), "BF16", ("s",), axes=(AxisMap(torch.arange(32).repeat(2)), AxisMap(groups)),
                     split=Split(1, groups, 10.0), seed=4)
    out = materialize(r, {"s": w}.__getitem__).float()
    assert torch.equal(out[:, :40] + out[:, 40:], w.float().repeat(2, 1))
    assert not torch.equal(out[:32], out[32:])


def test_recycled_buffers_come_back_only_from_the_executor_and_only_whole():
    pool = plan.Recycler(keep=2)
    with pool.running():
        a = pool.empty((100, 100), torch.bfloat16)
        pool.give(a[1:])  # a view into it is not the buffer handed out
        assert pool.empty((10, 10), torch.bfloat16).data_ptr() != a.data_ptr()
        pool.give(a)
        b = pool.empty((50, 10), torch.float32)  # smaller, any dtype: the same memory again
        assert b.data_ptr() == a.data_ptr() and b.shape == (50, 10)
        pool.give(b)
    assert not pool._free and not pool._out  # nothing held between runs
    c = pool.empty((4,), torch.float32)
    pool.give(c)
    assert not pool._free


def test_source_buffers_are_recycled_unless_the_output_uses_them(model_dir):
    """The executor reads source tensors into recycled buffers and gives each back once its recipe is
    built, except one the built tensor still uses (a copy made as is): the writer has yet to write it."""
    from types import SimpleNamespace

    from grow.checkpoint import Source, StreamHasher

    source = Source(model_dir("vit"))
    names = [n for n in source.tensors if n.endswith("weight")][:2]
    with plan.SOURCE_BUFFERS.running():
        reader = plan.Prefetcher(source, [SimpleNamespace(sources=(n,)) for n in names], StreamHasher([]))
        try:
            reader.start()
            free = lambda: {b.data_ptr() for b in plan.SOURCE_BUFFERS._free}  # noqa: E731
            as_is = reader.next()(names[0])
            assert as_is.data_ptr() in plan.SOURCE_BUFFERS._out  # read into a recycled buffer
            reader.recycle(as_is)  # built = the source tensor itself
            assert as_is.data_ptr() not in free()
            read = reader.next()(names[1])
            reader.recycle(read.float() * 2)  # built elsewhere: the source buffer is free again
            assert read.data_ptr() in free()
            assert torch.equal(as_is, source.get(names[0]))  # and the one in use was never overwritten
        finally:
            reader.stop()
    source.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tiled_copy_scales_by_powers_of_two_in_the_same_pass(dtype):
    """A tensor tiled along both axes and scaled by powers of two (one scale constant over each run,
    one not) is the gathered tensor times the scales, exactly."""
    src = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    rows, cols = torch.arange(6).repeat(2), torch.arange(4).repeat(2)
    row_scale = torch.tensor([1.0, 2.0, 0.5, 1.0, 0.25, 1.0] * 2)  # varies inside each run
    col_scale = torch.full((8,), 0.5)  # HyperCloning's fan-in half
    name = "BF16" if dtype == torch.bfloat16 else "F32"
    r = TensorRecipe("w", (12, 8), name, ("s",), axes=(AxisMap(rows, row_scale), AxisMap(cols, col_scale)), scale=4.0)
    out = materialize(r, {"s": src}.__getitem__)
    want = src.float()[rows][:, cols] * row_scale[:, None] * col_scale[None, :] * 4.0
    assert out.dtype == dtype and torch.equal(out.float(), want)


def test_recycler_keeps_the_largest_and_lets_go_of_what_no_tensor_to_come_needs():
    pool = plan.Recycler(keep=2)
    with pool.running():
        buffers = [pool.empty((n,), torch.uint8) for n in (3000, 4000, 1000, 2000)]
        for b in buffers:  # given back in this order
            pool.give(b)
        assert sorted(b.numel() for b in pool._free) == [3000, 4000]
        pool.trim(3500)  # every tensor to come is at most 3500 bytes
        assert [b.numel() for b in pool._free] == [3000]


def test_largest_ahead_looks_only_as_far_as_its_window():
    """What the executor trims source buffers to: a tied embedding, read first and last, is not held
    through the whole model."""
    sizes = [900, 10, 20, 10, 20, 900]
    assert plan._largest_ahead(sizes) == [900] * 6
    assert plan._largest_ahead(sizes, 2) == [900, 20, 20, 20, 900, 900]
