"""Plan: the target config plus one recipe per output tensor; executed one tensor at a time."""

from __future__ import annotations

import itertools
import json
import math
import queue
import shutil
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .checkpoint import DTYPES, Source, StreamHasher, numel, tensor_nbytes
from .writer import BLOCK, BackgroundWriter, ShardedWriter, atomic_folder, check_target

RECIPE_FILE = "grow.json"


@dataclass
class AxisMap:
    """How one output axis is made from the source axis: gather, then scale.

    index[j] is the source position that target position j copies, or -1 for a new position
    (filled from the recipe's init); scale[j] multiplies target position j (fan-in weights).
    mix = (positions, weights [m, source]) makes those target positions weighted sums of the
    source positions instead (e.g. the mean of a residual vector); they are not new.
    matrix [source, target] replaces the axis by its product with a dense matrix (a rotation of the
    residual stream), before any gather; prescale names a source vector that multiplies the axis
    first (a norm's weight folded into the Linear that reads it). Plans share one matrix object."""

    index: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    label: str = ""  # short human description for --dry-run
    mix: tuple[torch.Tensor, torch.Tensor] | None = None
    matrix: torch.Tensor | None = None
    prescale: str | None = None


@dataclass(frozen=True)
class Init:
    """Values that come from no source tensor."""

    kind: str = "zeros"  # zeros | ones | normal
    std: float = 0.0

    def sample(self, shape, gen: torch.Generator) -> torch.Tensor:
        if self.kind == "zeros":
            return torch.zeros(shape)
        if self.kind == "ones":
            return torch.ones(shape)
        if self.kind == "normal":
            return torch.randn(shape, generator=gen) * self.std
        raise ValueError(f"unknown init {self.kind}")

    def __str__(self) -> str:
        return f"normal(std={self.std:.3g})" if self.kind == "normal" else self.kind


@dataclass
class Noise:
    """Additive noise that sums to zero over the positions of `axis` sharing a group id, so that
    positions reading equal inputs still produce the same output together."""

    axis: int
    groups: torch.Tensor
    snr_db: float  # relative to the mean square of the tensor before noise


@dataclass
class Split:
    """Copies along `axis` that read equal inputs become random element-wise pieces of their group's
    value that sum to it exactly in the output dtype (groups[j]: group id of a copy, -1 where position j
    is not split). Each piece is its share 1/m plus zero-sum noise at snr_db relative to that share,
    rounded to a multiple of the value's own ulp, so that every piece and the last, the remainder, are
    representable: the forward pass stays exact in any dtype while the copies' gradients differ."""

    axis: int
    groups: torch.Tensor
    snr_db: float

    def label(self) -> str:
        return f"element-wise split at {self.snr_db:g} dB"


@dataclass
class TensorRecipe:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    sources: tuple[str, ...] = ()  # concatenated along concat_axis; none: the base comes from init
    concat_axis: int = 0
    base_shape: tuple[int, ...] | None = None  # shape of a generated base (defaults to shape)
    axes: tuple[AxisMap | None, ...] = ()
    scale: float = 1.0
    init: Init = Init()
    noise: Noise | None = None
    split: Split | None = None
    seed: int = 0
    note: str = ""
    # the model uses stored + offset (norms of the form 1 + w): scales and new values apply to that sum
    offset: float = 0.0

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    def rounds(self, source_dtypes: list[str]) -> bool:
        """Whether writing this tensor in its dtype rounds what the recipe computes from its sources:
        a dtype narrower than a source's, or 16-bit output of arithmetic other than power-of-two scaling."""
        if not self.sources:
            return False  # new values reproduce nothing
        widening = {("BF16", "F32"), ("F16", "F32"), ("BF16", "F64"), ("F16", "F64"), ("F32", "F64")}
        if any(d != self.dtype and (d, self.dtype) not in widening for d in source_dtypes):
            return True
        if self.dtype not in ("BF16", "F16"):
            return False
        if self.noise is not None or any(m is not None and (m.mix is not None or m.matrix is not None) for m in self.axes):
            return True
        if self.offset and (self.scale != 1.0 or any(m is not None and m.scale is not None for m in self.axes)):
            return True
        return not _powers_of_two([(k, m.scale) for k, m in enumerate(self.axes) if m is not None and m.scale is not None],
                                  self.scale)

    def describe(self) -> str:
        parts = [" + ".join(self.sources) if self.sources else f"new {self.init}"]
        parts += [f"axis {k}: {m.label}" for k, m in enumerate(self.axes) if m is not None and m.label]
        if self.scale != 1.0:
            parts.append(f"x {self.scale:.6g}" + (f" (on {self.offset:g} + w)" if self.offset else ""))
        if self.noise is not None:
            parts.append(f"zero-sum noise {self.noise.snr_db:g} dB")
        if self.split is not None:
            parts.append(self.split.label())
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


# output tensors handed to the writer ahead of the disk: a second one lets building go on while a
# write waits for the disk (one more tensor in memory)
WRITE_DEPTH = 2
WORK_ELEMENTS = 1 << 20  # float32 elements per working block (4 MB): bounds memory, stays in cache


def materialize(r: TensorRecipe, load: Callable[[str], torch.Tensor], workers: int | None = None) -> torch.Tensor:
    """Build one output tensor from its recipe.

    Gathers run in the source dtype (copies are exact in any dtype); the arithmetic (scales, new
    values, noise) runs in float32 over blocks of rows and is rounded once to the output dtype, so
    memory stays near source + output whatever the tensor size. A tiled split runs on `workers`
    threads of its own (default: torch's thread count)."""
    gen = torch.Generator().manual_seed(r.seed)
    out_dtype = DTYPES[r.dtype]
    if r.sources:
        parts = [load(s) for s in r.sources]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, r.concat_axis)
        del parts
    else:
        t = r.init.sample(r.base_shape or r.shape, gen)
    loaded = bool(r.sources) and len(r.sources) == 1
    tiled = _tiled_split(r)
    rows = None
    direct = None if tiled else _runs_per_axis(r, t.dim())
    # the last gather makes the output tensor (when no arithmetic follows): on a recycled buffer
    last = -1 if tiled else max((k for k, m in enumerate(r.axes) if m is not None and m.index is not None), default=-1)
    fresh_axes: list[tuple[int, torch.Tensor]] = []
    scales: list[tuple[int, torch.Tensor]] = []
    for axis, m in enumerate(r.axes):
        if m is None:
            continue
        if m.matrix is not None:
            with torch_threads(workers or torch.get_num_threads()):  # a matmul: all the cores
                t = contract(t, axis, m.matrix, load(m.prescale) if m.prescale else None)
            loaded = False
        if tiled and axis == 0 and r.split.axis != 0 and m.index is not None and (runs := index_runs(m.index)):
            rows = runs  # no gather: the split writes each run of rows from its source rows
            continue
        if tiled and axis == r.split.axis:  # gather one copy: the split writes all of them
            start, length, copies = tiled
            index = torch.cat([m.index[:start + length], m.index[start + copies * length:]])
            if not torch.equal(index, torch.arange(t.shape[axis])):
                t, loaded = gather(t, axis, index), False
            continue
        if m.index is not None:
            fresh = m.index < 0
            if direct is None:
                prior = t
                shape = (*t.shape[:axis], m.index.numel(), *t.shape[axis + 1:])
                into = RECYCLED.empty(shape, t.dtype) if axis == last and t.dtype == out_dtype else None
                t = gather(prior, axis, m.index.clamp(min=0), into)
                if m.mix is not None:  # positions that are weighted sums of source positions (float32)
                    at, weights = m.mix
                    prior, t = prior.float(), t.float()
                    mixed = torch.tensordot(prior.movedim(axis, -1), weights.to(torch.float32).T, dims=1)
                    t.index_copy_(axis, at, mixed.movedim(-1, axis))
                    fresh = fresh.clone()
                    fresh[at] = False
                del prior
            loaded = False
            if fresh.any():
                fresh_axes.append((axis, fresh))
        if m.scale is not None:
            scales.append((axis, m.scale.to(torch.float32)))
    if direct is not None:
        # scales by powers of two (HyperCloning's fan-in halves) ride along with the copy: one pass
        fuse = (not (fresh_axes or r.noise or r.split or r.offset) and t.dtype == out_dtype
                and _powers_of_two(scales, r.scale))
        t = _gather_runs(t, direct, out_dtype, scales if fuse else [], r.scale if fuse else 1.0)
        if fuse and tuple(t.shape) == tuple(r.shape):
            return t
    if tiled:
        return _split_tiled(t, r, *tiled, rows, workers=workers or torch.get_num_threads())
    if tuple(t.shape) != tuple(r.shape):
        raise RuntimeError(f"recipe for {r.name} made shape {list(t.shape)}, expected {list(r.shape)}")
    if not (scales or fresh_axes or r.noise or r.split or r.scale != 1.0):
        return t.to(out_dtype)
    if r.offset:
        # scale and fill offset + stored, then store the result less the offset
        t = t.to(torch.float32, copy=True).add_(r.offset)
        return _arithmetic(t, r, scales, fresh_axes, gen, 0).sub_(r.offset).to(out_dtype)
    if not (fresh_axes or r.noise or r.split) and t.dtype == out_dtype and _powers_of_two(scales, r.scale):
        # multiplying by 2^k rounds nothing: scale in the output dtype, one pass, no float32 copy
        out = t.clone() if loaded else t
        for axis, scale in scales:
            view = [1] * out.dim()
            view[axis] = -1
            out.mul_(scale.to(out_dtype).view(view))
        return out.mul_(r.scale) if r.scale != 1.0 else out
    if (r.noise is not None and r.noise.axis == 0) or (r.split is not None and r.split.axis == 0):
        # noise that must sum to zero (pieces that must sum to a value) down the rows needs every row at once
        return _arithmetic(t.to(torch.float32, copy=True), r, scales, fresh_axes, gen, 0).to(out_dtype)
    # write into t itself when it is a private tensor of the output dtype, else into a fresh one
    out = t if (t.dtype == out_dtype and not loaded) else torch.empty(r.shape, dtype=out_dtype)
    rows = r.shape[0] if r.shape else 1
    step = max(1, WORK_ELEMENTS // max(1, t.numel() // max(rows, 1)))
    noise_std = _noise_std(t, r, scales, step) if r.noise is not None else None
    for a in range(0, rows, step):
        block = t[a:a + step].to(torch.float32, copy=True) if r.shape else t.to(torch.float32, copy=True)
        block = _arithmetic(block, r, scales, fresh_axes, gen, a, noise_std)
        if r.shape:
            out[a:a + step] = block
        else:
            out.copy_(block)
    return out


def contract(t: torch.Tensor, axis: int, matrix: torch.Tensor, prescale: torch.Tensor | None = None) -> torch.Tensor:
    """t with `axis` replaced by (t * prescale) @ matrix along it, in float32, a block of the other axes
    at a time (no float32 copy of the whole source)."""
    m = matrix.to(torch.float32)
    if prescale is not None:
        m = prescale.to(torch.float32)[:, None] * m
    moved = t.movedim(axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    out = torch.empty(flat.shape[0], m.shape[1], dtype=torch.float32)
    step = max(1, WORK_ELEMENTS // max(1, flat.shape[1]))
    for a in range(0, flat.shape[0], step):
        torch.matmul(flat[a:a + step].to(torch.float32), m, out=out[a:a + step])
    return out.view(*moved.shape[:-1], m.shape[1]).movedim(-1, axis).contiguous()


def gather(t: torch.Tensor, axis: int, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """t.index_select(axis, index), done as a few slice copies when the index is a few contiguous
    runs (tiling, truncation): memory-speed instead of an element-wise gather. Into `out` if given."""
    runs = index_runs(index)
    if runs is None:
        return t.index_select(axis, index) if out is None else torch.index_select(t, axis, index, out=out)
    if out is None:
        pieces = [t.narrow(axis, at, n) for _, at, n in runs]
        return pieces[0].clone() if len(pieces) == 1 else torch.cat(pieces, axis)
    for to, at, n in runs:
        out.narrow(axis, to, n).copy_(t.narrow(axis, at, n))
    return out


def _runs_per_axis(r: TensorRecipe, dims: int) -> list | None:
    """index_runs of every gathered axis (None for the others) when a recipe gathers two axes or more,
    each in a few runs, and does nothing else between them: then one pass copies the blocks from source
    to output, without a tensor per axis."""
    maps = [r.axes[k] if k < len(r.axes) else None for k in range(dims)]
    if sum(m is not None and m.index is not None for m in maps) < 2:
        return None
    if any(m is not None and (m.mix is not None or m.matrix is not None) for m in maps):
        return None
    runs = [index_runs(m.index.clamp(min=0)) if m is not None and m.index is not None else None for m in maps]
    gathered = [x for m, x in zip(maps, runs) if m is not None and m.index is not None]
    if any(x is None for x in gathered) or math.prod(len(x) for x in gathered) > 256:
        return None
    return runs


def _gather_runs(t: torch.Tensor, runs: list, out_dtype: torch.dtype, scales=(), scale: float = 1.0) -> torch.Tensor:
    """gather() along every axis at once: one slice copy per combination of the axes' runs, times
    `scale` and the per-axis `scales` (powers of two: exact in any dtype) if given."""
    shape = tuple(sum(n for _, _, n in x) if x else t.shape[k] for k, x in enumerate(runs))
    out = RECYCLED.empty(shape, t.dtype) if t.dtype == out_dtype else torch.empty(shape, dtype=t.dtype)
    for combo in itertools.product(*[x or [(0, 0, t.shape[k])] for k, x in enumerate(runs)]):
        src, dst = t, out
        for k, (to, at, n) in enumerate(combo):
            src, dst = src.narrow(k, at, n), dst.narrow(k, to, n)
        constant, varying = scale, []
        for axis, s in scales:
            part = s.narrow(0, combo[axis][0], combo[axis][2])
            if bool((part == part[0]).all()):
                constant *= float(part[0])  # powers of two: the product is exact
            else:
                view = [1] * dst.dim()
                view[axis] = -1
                varying.append(part.to(out_dtype).view(view))
        if constant == 1.0:
            dst.copy_(src)
        else:
            torch.mul(src, constant, out=dst)
        for f in varying:
            dst.mul_(f)
    return out


def index_runs(index: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """The index as (target start, source start, length) of its contiguous runs, or None when it has
    none or more than 64 (an element-wise gather is then faster)."""
    breaks = torch.nonzero(index[1:] != index[:-1] + 1).flatten() + 1
    if index.numel() == 0 or breaks.numel() >= 64:
        return None
    starts = [0, *breaks.tolist()]
    ends = [*breaks.tolist(), index.numel()]
    return [(a, int(index[a]), b - a) for a, b in zip(starts, ends)]


def _arithmetic(block, r: TensorRecipe, scales, fresh_axes, gen, row0: int, noise_std: float | None = None):
    """Scales, new values and noise on a block of rows starting at row0 (float32, in place where possible)."""
    n = block.shape[0] if block.dim() else 1
    for axis, scale in scales:
        view = [1] * block.dim()
        view[axis] = -1
        block.mul_((scale[row0:row0 + n] if axis == 0 else scale).view(view))
    if r.scale != 1.0:
        block.mul_(r.scale)
    if r.split is not None:
        block = split_pieces(block, r.split, DTYPES[r.dtype], gen)
    if fresh_axes:
        mask = torch.zeros(block.shape, dtype=torch.bool)
        for axis, fresh in fresh_axes:
            view = [1] * block.dim()
            view[axis] = -1
            mask |= (fresh[row0:row0 + n] if axis == 0 else fresh).view(view)
        block.masked_scatter_(mask, r.init.sample((int(mask.sum()),), gen))  # draw only what is new
    if r.noise is not None:
        std = noise_std if noise_std is not None else _std_for_snr(block.pow(2).mean().item(), r.noise.snr_db)
        block.add_(zero_sum_noise(block.shape, r.noise, std, gen))
    return block


def _powers_of_two(scales, scalar: float) -> bool:
    values = torch.cat([s.flatten() for _, s in scales] + [torch.tensor([scalar], dtype=torch.float32)])
    mantissa, _ = torch.frexp(values)
    return bool(torch.all((mantissa.abs() == 0.5) | (values == 0)))  # zero (a silenced writer) rounds nothing


def _std_for_snr(power: float, snr_db: float) -> float:
    return (power / 10 ** (snr_db / 10)) ** 0.5


def _noise_std(t: torch.Tensor, r: TensorRecipe, scales, step: int) -> float:
    """Noise level from the mean square of the whole (scaled) tensor, measured block by block."""
    total, count = 0.0, 0
    for a in range(0, t.shape[0], step):
        block = t[a:a + step].to(torch.float32, copy=True)
        for axis, scale in scales:
            view = [1] * block.dim()
            view[axis] = -1
            block.mul_((scale[a:a + step] if axis == 0 else scale).view(view))
        total += block.mul_(r.scale).pow_(2).sum().item()
        count += block.numel()
    return _std_for_snr(total / max(count, 1), r.noise.snr_db)


# (significand bits, exponent of the smallest subnormal) of the floating-point output dtypes
_FORMATS = {torch.float32: (24, -149), torch.bfloat16: (8, -133), torch.float16: (11, -24)}
SPLIT_BLOCK = 1 << 18  # values per working block of a split: its float32 temporaries stay in cache


def split_pieces(block: torch.Tensor, split: Split, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Replace the copies of each group along split.axis (equal values V) by pieces that sum to V
    exactly once written in `dtype` (see _fill_pieces), for any grouping: groups of one size m are
    gathered into a [..., groups, m] block. Tiled copies take the faster split_tiles_."""
    x = block.movedim(split.axis, -1)
    out = x.to(dtype).float()  # the values the pieces must sum to, as the output dtype holds them
    groups = split.groups.long()
    member = torch.nonzero(groups >= 0).flatten()
    if not member.numel():
        return block
    # member positions ordered by group, so that each group's copies are adjacent
    member = member[torch.argsort(groups[member], stable=True)]
    size = torch.bincount(groups[member])[groups[member]]
    for m in size.unique().tolist():
        at = member[size == m]  # positions of the groups of m copies, group after group
        v = out.index_select(-1, at).unflatten(-1, (-1, m))
        _fill_pieces(v[..., 0].contiguous(), v.unbind(-1), split.snr_db, dtype, _bit_generator(gen))
        out.index_copy_(-1, at, v.flatten(-2))
    return out.movedim(-1, split.axis)


def tiles(groups: torch.Tensor) -> tuple[int, int, int] | None:
    """(start, length, m) when the split positions are m adjacent runs of `length` positions whose k-th
    positions form one group (HyperCloning's tiling, LEMON's whole copies), else None."""
    member = torch.nonzero(groups >= 0).flatten()
    if not member.numel():
        return None
    start, stop = int(member[0]), int(member[-1]) + 1
    first = groups[start:stop]
    length = int(torch.unique(first).numel())
    if member.numel() != stop - start or (stop - start) % length or (stop - start) // length < 2:
        return None
    runs = first.view(-1, length)
    return (start, length, runs.shape[0]) if bool((runs == runs[:1]).all()) else None


def _tiled_split(r: TensorRecipe) -> tuple[int, int, int] | None:
    """tiles() of the recipe's split when the split is all the arithmetic it does (no scales, new
    positions or noise), so that its copies can be written straight from one gathered copy."""
    if r.split is None or r.noise is not None or r.offset or r.scale != 1.0:
        return None
    if any(m is not None and (m.scale is not None or m.mix is not None or m.matrix is not None
                              or (m.index is not None and bool((m.index < 0).any()))) for m in r.axes):
        return None
    return tiles(r.split.groups)


def _split_tiled(t: torch.Tensor, r: TensorRecipe, start: int, length: int, copies: int,
                 rows: list[tuple[int, int, int]] | None = None, workers: int = 1) -> torch.Tensor:
    """The output of a tiled split from t, gathered with one copy of the split positions (and, given
    `rows` as index_runs, not gathered along axis 0): positions outside the copies are copied, the
    copies are written as pieces of t's copy (split_tiles_)."""
    axis, out = r.split.axis, RECYCLED.empty(r.shape, DTYPES[r.dtype])
    tail = r.shape[axis] - start - copies * length
    want = list(out.narrow(axis, 0, start + length + tail).shape)
    if rows is not None:
        want[0] = t.shape[0]
    if list(t.shape) != want:
        raise RuntimeError(f"recipe for {r.name} made shape {list(t.shape)} for one copy, expected {list(r.shape)}")
    jobs = []
    for k, (to, at, n) in enumerate(rows or [(0, 0, r.shape[0] if r.shape else 1)]):
        src, dst = (t.narrow(0, at, n), out.narrow(0, to, n)) if rows else (t, out)
        dst.narrow(axis, 0, start).copy_(src.narrow(axis, 0, start))
        dst.narrow(axis, start + copies * length, tail).copy_(src.narrow(axis, start + length, tail))
        pieces = [dst.narrow(axis, start + c * length, length) for c in range(copies)]
        jobs.append((src.narrow(axis, start, length), pieces, (r.seed + k * 1_000_033) % 2**63))
    split_tiles_(jobs, r.split.snr_db, workers=workers)  # every run of rows at once: the threads wait once
    return out


class Recycler:
    """Output buffers that the writer has finished with, handed out again for later outputs: their
    pages are already mapped, where a fresh buffer costs the kernel a page fault and a zeroed page for
    every 4 kB (or 2 MB), which was most of the system time of a run (on a virtual machine a fresh page
    can also cost the host a fault). Source tensors are read into a pool of their own. Holds at most
    `keep` free buffers (the largest), none larger than the tensors to come need (trim), and none
    outside the executor (between runs the memory goes back). With `align`, a tensor starts `phase`
    bytes past a multiple of it: the executor sets the phase to where the tensor will lie in its file,
    so that the writer sends it to disk from where it is (O_DIRECT wants both aligned alike)."""

    def __init__(self, keep: int = 6, align: int = 1):
        self.keep = keep
        self.align = align
        self.phase = 0
        self.active = False
        self._free: list[torch.Tensor] = []
        self._out: OrderedDict = OrderedDict()  # addresses of the buffers handed out (only those come back)
        self._lock = threading.Lock()

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """torch.empty(shape, dtype), on a recycled buffer when one is large enough."""
        nbytes = numel(shape) * torch.empty((), dtype=dtype).element_size()
        size = nbytes + self.align - 1
        with self._lock:
            fits = [b for b in self._free if b.numel() >= size]
            buf = min(fits, key=torch.Tensor.numel) if fits else None
            if buf is not None:
                self._free = [b for b in self._free if b is not buf]  # (== would compare the contents)
        if buf is None:
            buf = torch.empty(max(size, 1), dtype=torch.uint8)
        skip = (self.phase - buf.data_ptr()) % self.align
        out = buf[skip:skip + nbytes]
        if self.active:
            with self._lock:
                self._out[out.data_ptr()] = None  # an address only: a buffer never given back is freed with its user
                while len(self._out) > 64:
                    self._out.popitem(last=False)
        return out.view(dtype).view(shape)

    def give(self, t: torch.Tensor) -> None:
        """Take back a tensor from empty() whose memory nothing uses any more."""
        with self._lock:  # (the tensor itself, not a view into part of it)
            if not self.active or self._out.pop(t.data_ptr(), 0) is not None:
                return
            self._free.append(torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()))
            self._free.sort(key=torch.Tensor.numel)
            del self._free[: max(0, len(self._free) - self.keep)]  # the smallest

    def trim(self, nbytes: int) -> None:
        """Let go of the free buffers larger than nbytes (no tensor to come needs one)."""
        with self._lock:
            self._free = [b for b in self._free if b.numel() <= nbytes]

    @contextmanager
    def running(self):
        self.active = True
        try:
            yield self
        finally:
            self.active = False
            self.phase = 0
            with self._lock:
                self._free.clear()
                self._out.clear()


RECYCLED = Recycler(align=BLOCK)
# source tensors are read into buffers of their own: taking output buffers (up to 4x larger in a 2x
# widening) left the large outputs to fresh memory, and peak RSS grew by a largest tensor. The largest
# are kept, so that a layer's small tensors reuse its large ones' buffers (keeping the latest, the
# small ones, read a third of a Llama's bytes into fresh pages), but only while a tensor within the
# next SOURCE_WINDOW recipes needs one that large: a tied embedding, read first and last, is let go.
SOURCE_BUFFERS = Recycler(keep=3)
SOURCE_WINDOW = 16


def _recycled_bytes(nbytes: int) -> torch.Tensor:
    """A uint8 buffer to read a source tensor into (a fresh one costs a zeroed page per 4 kB)."""
    return SOURCE_BUFFERS.empty((nbytes,), torch.uint8)


def split_tiles_(jobs: list[tuple[torch.Tensor, list[torch.Tensor], int]], snr_db: float, workers: int = 1) -> None:
    """For each job (values, copies, seed): write into the `copies` (views of one output dtype) pieces
    that sum to `values` (any dtype, rounded to the copies' first), as split_pieces does, in blocks of
    SPLIT_BLOCK values along axis 0 that `workers` threads share. Block k of a job draws from a
    generator seeded by (seed, k), so the result does not depend on the threads. Jobs that split the
    same values (the copies of a row) share each block's float32 values and grid."""
    same: dict = {}  # jobs by the values they split
    for values, copies, seed in jobs:
        same.setdefault((values.data_ptr(), values.shape, values.stride()), (values, []))[1].append((copies, seed))
    blocks = []  # (values, [(copies, seed)], block number, first row, rows)
    for values, outputs in same.values():
        rows = values.shape[0] if values.dim() else 1
        step = max(1, SPLIT_BLOCK // max(1, values.numel() // max(rows, 1)))
        blocks += [(values, outputs, k, a, step) for k, a in enumerate(range(0, rows, step))]

    def run(values, outputs, k, a, step) -> None:
        dtype = outputs[0][0][0].dtype
        block = (values[a:a + step] if values.dim() else values).to(dtype)
        base = SCRATCH.take("base", block.shape, torch.float32).copy_(block)
        views = [[c[a:a + step] for c in copies] if values.dim() else copies for copies, _ in outputs]
        gens = [np.random.SFC64((seed * 1_000_003 + k) % 2**63) for _, seed in outputs]
        if len(views[0]) == 2 and _halves(base, views, snr_db, dtype, gens, SCRATCH):
            return
        to_grid = _grid(base, dtype, SCRATCH)
        for pieces, gen in zip(views, gens):  # (_fill_pieces spends its value: one job takes base itself)
            value = base if len(views) == 1 else SCRATCH.take("value", block.shape, torch.float32).copy_(base)
            _fill_pieces(value, pieces, snr_db, dtype, gen, SCRATCH, to_grid)

    if workers > 1 and len(blocks) > 1:
        pool = _workers(workers)
        with torch_threads():
            futures = [pool.submit(run, *b) for b in blocks]
            try:
                for f in futures:
                    f.result()
            finally:  # (Ctrl-C) no block may still run when torch's thread count is restored: that aborts
                for f in futures:
                    f.cancel()
                wait(futures)
    else:
        for b in blocks:
            run(*b)


class Scratch(threading.local):
    """Buffers for a thread's temporaries, reused block after block: a fresh buffer of a megabyte costs
    the kernel a page fault per 4 kB each time."""

    def __init__(self):
        self.buffers: dict = {}

    def take(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        n = numel(shape)
        buf = self.buffers.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self.buffers[(name, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)


class _Fresh:
    """Scratch's interface without reuse (the general split path)."""

    @staticmethod
    def take(name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)


SCRATCH = Scratch()
_POOL: list = []  # the threads that share split blocks, kept (with their scratch buffers) between tensors


def _workers(n: int) -> ThreadPoolExecutor:
    if not _POOL or _POOL[0]._max_workers != n:
        _POOL[:] = [ThreadPoolExecutor(n, thread_name_prefix="grow-split")]
    return _POOL[0]


@contextmanager
def torch_threads(threads: int = 1):
    """torch ops on `threads` threads, by default one while threads of our own share the work: an
    intra-op thread team that waits for a busy core stalls every op (planning a 13-layer Llama's
    HyperCloning took 2.2 s with two threads and the other core busy, 0.06 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fill_pieces(value: torch.Tensor, copies, snr_db: float, dtype: torch.dtype, gen: np.random.SFC64,
                 scratch=_Fresh, to_grid: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Write into the m `copies` pieces that sum to `value` (float32, holding values of `dtype`) exactly
    in `dtype`. Piece c is the remainder so far times a random ratio, rounded to a multiple of the ulp of
    the value in `dtype`, so that every piece lies between 0 and the value: a multiple of that ulp no
    larger than the value is representable, and so is each remainder. The shares are 1/m plus zero-sum
    uniform noise of standard deviation 10^(-snr/20)/m (clipped to [0, 1]; a share larger than what is
    left takes all of it); the last piece is the remainder. `to_grid`: _grid of the value, if made."""
    m = len(copies)
    shares = _shares(value.shape, m, snr_db, gen, scratch)
    to_grid = to_grid or _grid(value, dtype, scratch)
    rest, left = value, None  # what is still to give out, and its share of the value
    for c in range(m - 1):
        if left is None:
            ratio, left = shares[c], (1 - shares[c] if m > 2 else None)
        else:
            ratio, left = (shares[c] / left).nan_to_num_(0.0).clamp_(0, 1), left - shares[c]
        piece = to_grid(ratio.mul_(rest))
        copies[c].copy_(piece)
        rest.sub_(piece)
    copies[m - 1].copy_(rest)


def _halves(value: torch.Tensor, jobs: list, snr_db: float, dtype: torch.dtype, gens: list, scratch=_Fresh) -> bool:
    """_fill_pieces for two pieces in a 16-bit dtype (the default of a x2 widening), for each job's pair
    of copies and generator, from the same values: six passes per pair where _fill_pieces takes ten.
    False, having done nothing, where it does not apply (shares that need clipping, values too large
    for the rounding constant C). The same draws and shares: with h = C + value * (1/2 + a/2), the
    first piece is (h + value * a * draw) - C, rounded to the grid by each addition (every number
    between C - value and C + value is a multiple of the ulp; each rounds a number between 0 and the
    value, by less than half an ulp), and the second is value - first, exact in float32 and in dtype."""
    a, b, clips = _half_share(snr_db)
    if _FORMATS[dtype][0] == 24 or clips:
        return False
    magic = _rounding_constant(value, dtype, scratch)
    if magic is None:
        return False
    half = torch.add(magic, value, alpha=b, out=scratch.take("half", value.shape, torch.float32))
    for (first, second), gen in zip(jobs, gens):
        piece = torch.addcmul(half, _draws(value.shape, gen, scratch), value, value=a,
                              out=scratch.take("piece", value.shape, torch.float32))
        first.copy_(piece.sub_(magic))
        second.copy_(torch.sub(value, piece, out=piece))
    return True


def _bit_generator(gen: torch.Generator) -> np.random.SFC64:
    """A fast bit generator seeded from torch's (SFC64 makes random bits in half the time of torch's
    Mersenne twister, which was a tenth of a default HyperCloning run's CPU)."""
    return np.random.SFC64(int(torch.randint(2**62, (), generator=gen)))


def _shares(shape, m: int, snr_db: float, gen: np.random.SFC64, scratch=_Fresh) -> list[torch.Tensor]:
    """The random shares of the first m - 1 pieces (float32 tensors of `shape`), 8 random bits each:
    256 levels of noise are finer than the bfloat16 grid the pieces are rounded to (coarser than the
    float16 and float32 grids, which changes the noise's level by nothing and its randomness by little),
    and making 16 bits was a fifth of a split's time."""
    sigma = 10 ** (-snr_db / 20)
    u = _draws((1 if m == 2 else m, *shape), gen, scratch)  # two pieces: one draw (the other share is what is left)
    if m == 2:
        a, b, clips = _half_share(snr_db)
        share = u[0].mul_(a).add_(b)
        return [share.clamp_(0, 1) if clips else share]
    z = u.add_(0.5).mul_(_UNIT)
    z.sub_(z.mean(0, keepdim=True)).mul_((m / (m - 1)) ** 0.5)  # centred over the group, variance restored
    return list(z.mul_(sigma / m).add_(1 / m).clamp_(0, 1).unbind(0))[: m - 1]


# (u + 0.5) / 128 for u uniform on [-128, 127] is uniform on (-1, 1) with variance 1/3 (less 1/196608):
# times sqrt(3), unit variance
_UNIT = 3 ** 0.5 / 128


def _half_share(snr_db: float) -> tuple[float, float, bool]:
    """(a, b, clips): the first of two pieces' share is b + a * draw (_draws), 1/2 plus uniform noise of
    standard deviation 10^(-snr/20)/2; clips: whether it can leave [0, 1] (half-width sqrt(3) times that)."""
    sigma = 10 ** (-snr_db / 20)
    a = sigma / 2 * _UNIT
    return a, 0.5 + a * 0.5, sigma / 2 * 3 ** 0.5 > 0.5


def _draws(shape, gen: np.random.SFC64, scratch=_Fresh) -> torch.Tensor:
    """Random integers uniform on [-128, 127], as float32 of `shape`."""
    n = numel(shape)
    bits = torch.from_numpy(gen.random_raw((n + 7) // 8).view(np.int8))
    return scratch.take("shares", (n,), torch.float32).copy_(bits[:n]).view(shape)


def _rounding_constant(value: torch.Tensor, dtype: torch.dtype, scratch=_Fresh) -> torch.Tensor | None:
    """For a 16-bit dtype, C = 1.5 * 2^23 * the ulp each value has in `dtype` (float32): adding C to a
    number no larger than the value rounds it to a multiple of that ulp (C + x stays in C's binade,
    whose float32 step is the ulp). None where C would not be finite (values from 2^(104 + bits) up)."""
    bits = _FORMATS[dtype][0]
    exponent, emin = _exponent(value, dtype, scratch)
    low, high = torch.aminmax(exponent)
    if int(high) > (230 + bits) << 23:
        return None
    if int(low) < emin:
        exponent.clamp_(min=emin)
    return exponent.add_(((24 - bits) << 23) + (1 << 22)).view(torch.float32)


def _exponent(value: torch.Tensor, dtype: torch.dtype, scratch=_Fresh) -> tuple[torch.Tensor, int]:
    """Each value's power of two as float32 bits (int32), and the least one whose ulp in `dtype` scales
    with it: below the smallest normal of dtype the ulp stays the subnormal step."""
    bits, tiny = _FORMATS[dtype]
    exponent = torch.bitwise_and(value.view(torch.int32), 0x7F800000,
                                 out=scratch.take("exponent", value.shape, torch.int32))
    return exponent, (tiny + bits - 1 + 127) << 23


def _grid(value: torch.Tensor, dtype: torch.dtype, scratch=_Fresh) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function rounding, in place, numbers between 0 and `value` to multiples of the ulp that the
    value has in `dtype` (between 0 and the value too: both ends are multiples)."""
    bits = _FORMATS[dtype][0]
    magic = _rounding_constant(value, dtype, scratch) if bits < 24 else None
    if magic is not None:
        return lambda x: x.add_(magic).sub_(magic)
    # float32 (or huge values): truncate x / ulp through int32 (exact: x / ulp < 2^24)
    exponent, emin = _exponent(value, dtype, scratch)
    ulp = exponent.clamp_(min=emin).view(torch.float32).mul_(2.0 ** (1 - bits))
    return lambda x: x.copy_(x.div_(ulp).int()).mul_(ulp)


def zero_sum_noise(shape, noise: Noise, std: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise of the given std that sums to zero within each group along noise.axis."""
    n = torch.randn(shape, generator=gen)
    groups = noise.groups.long()
    ngroups = int(groups.max()) + 1
    moved = n.movedim(noise.axis, 0)
    sums = torch.zeros((ngroups, *moved.shape[1:])).index_add_(0, groups, moved)
    counts = torch.bincount(groups, minlength=ngroups).float().view(-1, *[1] * (moved.dim() - 1))
    moved -= (sums / counts)[groups]
    # centring a group of m removes 1/m of the variance; restore it so the SNR is the one asked for
    m = counts[groups]
    moved *= torch.where(m > 1, (m / (m - 1).clamp_min(1)).sqrt(), torch.zeros(())) * std
    return moved.movedim(0, noise.axis)


@dataclass
class Plan:
    operation: str  # expand | shrink | upcycle
    method: str
    exact: bool  # whether the target must reproduce the source's outputs
    architecture: str
    config: dict  # the target's config.json
    recipes: list[TensorRecipe]
    source_sizes: dict[str, int]
    target_sizes: dict[str, int]
    options: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra_files: dict[str, dict] = field(default_factory=dict)  # JSON files written beside the weights
    stats: dict = field(default_factory=dict)  # operator-specific figures for --dry-run and grow.json
    rounded: bool = False  # an exact method whose 16-bit output rounds what it computes (exact in float32)

    @property
    def num_parameters(self) -> int:
        return sum(numel(r.shape) for r in self.recipes)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.recipes)

    def check_rounding(self, source: Source) -> None:
        """An exact method stops being exact where the output dtype rounds what it computes: say so."""
        rounded = [r.name for r in self.recipes if r.rounds([source.tensors[n].dtype for n in r.sources])]
        if self.exact and rounded:
            self.exact, self.rounded = False, True
            self.notes.append(f"not exact: {len(rounded)} tensors (e.g. {rounded[0]}) round in 16 bits; "
                              "use --dtype float32 for an exact model.")

    def recipe_record(self, source: Source) -> dict:
        return {
            "grow_version": __version__,
            "operation": self.operation,
            "method": self.method,
            "exact": self.exact,
            "options": self.options,
            "notes": self.notes,
            "architecture": self.architecture,
            "source": {"id": source.id, "sizes": self.source_sizes},
            "target": {"sizes": self.target_sizes, "parameters": self.num_parameters},
            **({"stats": self.stats} if self.stats else {}),
        }

    def summary(self) -> dict:
        return {
            "operation": self.operation,
            "method": self.method,
            "exact": self.exact,
            "architecture": self.architecture,
            "source_sizes": self.source_sizes,
            "target_sizes": self.target_sizes,
            "parameters": self.num_parameters,
            "bytes": self.nbytes,
            "notes": self.notes,
            **({"stats": self.stats} if self.stats else {}),
            "tensors": [
                {"name": r.name, "shape": list(r.shape), "dtype": r.dtype, "recipe": r.describe()} for r in self.recipes
            ],
        }


def execute(plan: Plan, source: Source, dst: Path, *, shard_size: int | None, force: bool = False,
            progress: Callable[[str, int, int | None], None] | None = None, hasher: StreamHasher | None = None) -> dict:
    """Stream the plan into dst: one thread reads (and hashes, continuing `hasher` if given) the sources
    of the next tensor while this one is built and the previous one is written by another."""
    dst = Path(dst)
    check_target(source.path, dst, force)
    start = time.perf_counter()
    with atomic_folder(dst, force) as tmp:
        written = [0]

        def on_written(t: torch.Tensor) -> None:
            written[0] += t.numel() * t.element_size()
            RECYCLED.give(t)
            if progress:
                progress("writing", written[0], plan.nbytes)

        layout = ShardedWriter(tmp, [(r.name, r.dtype, r.shape) for r in plan.recipes], shard_size)
        writer = BackgroundWriter(layout, on_written, depth=WRITE_DEPTH)
        if hasher is None:
            hasher = StreamHasher(source.hashed_files())
        hasher.take_over(progress)
        reader = Prefetcher(source, plan.recipes, hasher)
        try:  # threads start inside: a Ctrl-C at any moment stops and joins them (one still running torch
            # code when the interpreter exits aborts the process)
            writer.start()
            reader.start()
            if progress:
                progress("writing", 0, plan.nbytes)
            outputs = _largest_ahead([tensor_nbytes(r.dtype, r.shape) for r in plan.recipes])
            sources = _largest_ahead([max((source.tensors[n].nbytes for n in r.sources), default=0)
                                      for r in plan.recipes], SOURCE_WINDOW)
            workers = torch.get_num_threads()  # for the splits; every other op on the builder's own thread,
            # while the reading, hashing and writing threads keep the other cores busy
            with RECYCLED.running(), SOURCE_BUFFERS.running(), torch_threads():
                for k, r in enumerate(plan.recipes):
                    RECYCLED.trim(outputs[k])  # a free buffer no later tensor needs is let go
                    SOURCE_BUFFERS.trim(sources[k])
                    RECYCLED.phase = layout.file_offsets[k] % BLOCK
                    built = materialize(r, reader.next(), workers)
                    reader.recycle(built)
                    writer.submit(r.name, built)
                    del built
            files = writer.close()
            hashes = reader.finish()
        finally:
            try:
                writer.stop()
            finally:
                reader.stop()
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        for f in source.companion_files():
            shutil.copy2(f, tmp / f.name)
        for name, content in plan.extra_files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        record = plan.recipe_record(source)
        record["source"]["files"] = {str(p.relative_to(source.path)): h for p, h in hashes.items()}
        record["target"]["files"] = files
        (tmp / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(plan, source))
    return {"seconds": time.perf_counter() - start, "files": files, "bytes": plan.nbytes}


def _largest_ahead(sizes: list[int], window: int | None = None) -> list[int]:
    """[max(sizes[k:k + window]) for every k] (to the end without a window)."""
    if window is None:
        return list(itertools.accumulate(reversed(sizes), max))[::-1]
    return [max(sizes[k:k + window]) for k in range(len(sizes))]


class Prefetcher:
    """Reads the source tensors of each recipe, in plan order, one recipe ahead of the builder, on a
    thread of its own (file reads and sha256 release the GIL), feeding every read to the hasher."""

    def __init__(self, source: Source, recipes: list[TensorRecipe], hasher: StreamHasher):
        self.source = source
        self.hasher = hasher
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._last: dict[str, torch.Tensor] = {}
        self._thread = threading.Thread(target=self._run, args=([r.sources for r in recipes],), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self, needs: list[tuple[str, ...]]) -> None:
        try:
            for names in needs:
                if self._stop.is_set():
                    return
                tensors = {name: self.source.get(name, _recycled_bytes) for name in names}
                self._put(tensors)
                # hashed while the builder works: their buffers, even once given back, are reused only by
                # this thread's next reads
                for name, t in tensors.items():
                    info = self.source.tensors[name]
                    self.hasher.feed(info.file, info.offset, t.reshape(-1).view(torch.uint8).numpy())
                del tensors
        except BaseException as e:  # handed to the builder at its next call
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> Callable[[str], torch.Tensor]:
        """The loader of the next recipe: its sources as read ahead; any other tensor it asks for (a norm
        weight folded into a reader) read then."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._last = item
        return lambda name: item[name] if name in item else self.source.get(name)

    def recycle(self, built: torch.Tensor) -> None:
        """Give the last recipe's source buffers back for later reads, all but any that `built` (the
        tensor made from them, on its way to the writer) still uses."""
        keep = built.untyped_storage().data_ptr()
        for t in self._last.values():
            if t.untyped_storage().data_ptr() != keep:
                SOURCE_BUFFERS.give(t)
        self._last = {}

    def finish(self) -> dict[Path, str]:
        """The hashes of every file, once every recipe has been read (reading what no recipe read)."""
        self._thread.join()
        return self.hasher.finish()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # (started)
            self._thread.join()


PAST_TENSE = {"expand": "expanded", "shrink": "shrunk", "upcycle": "upcycled"}


def _model_card(plan: Plan, source: Source) -> str:
    rows = "\n".join(
        f"| {k} | {plan.source_sizes.get(k, '')} | {v} |" for k, v in plan.target_sizes.items()
    )
    if plan.exact:
        exact = "function-preserving (check it with `grow verify`)"
    elif plan.rounded:
        exact = ("function-preserving up to the rounding of its 16-bit weights: the method is exact, and "
                 "`--dtype float32` gives an exact copy")
    else:
        exact = "not function-preserving by design"
    notes = "".join(f"- {n}\n" for n in plan.notes)
    return (
        f"# {plan.architecture}, {PAST_TENSE.get(plan.operation, plan.operation + 'ed')} with grow\n\n"
        f"Made from `{source.id}` by `grow {plan.operation}` with method {plan.method} (grow {__version__}); "
        f"the result is {exact}. `grow.json` holds the full recipe and the source file hashes.\n\n"
        f"| size | source | target |\n|---|---|---|\n{rows}\n\n{notes}"
    )
