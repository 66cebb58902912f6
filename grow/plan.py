"""Plan: the target config plus one recipe per output tensor; executed one tensor at a time."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .checkpoint import DTYPES, ITEMSIZE, Source, sha256_file
from .writer import ShardedWriter, atomic_folder, check_target

RECIPE_FILE = "grow.json"


@dataclass
class AxisMap:
    """How one output axis is made from the source axis: gather, then scale.

    index[j] is the source position that target position j copies, or -1 for a new position
    (filled from the recipe's init); scale[j] multiplies target position j (fan-in weights)."""

    index: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    label: str = ""  # short human description for --dry-run


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
    seed: int = 0
    note: str = ""

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n

    def describe(self) -> str:
        parts = [" + ".join(self.sources) if self.sources else f"new {self.init}"]
        parts += [f"axis {k}: {m.label}" for k, m in enumerate(self.axes) if m is not None and m.label]
        if self.scale != 1.0:
            parts.append(f"x {self.scale:.6g}")
        if self.noise is not None:
            parts.append(f"zero-sum noise {self.noise.snr_db:g} dB")
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


def materialize(r: TensorRecipe, load: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Build one output tensor in float32 from its recipe, then cast it to the output dtype."""
    gen = torch.Generator().manual_seed(r.seed)
    if r.sources:
        parts = [load(s) for s in r.sources]
        t = parts[0] if len(parts) == 1 else torch.cat([p.float() for p in parts], r.concat_axis)
        loaded = parts[0] if len(parts) == 1 else None  # the loader's tensor: never modified in place
        del parts
    else:
        t, loaded = r.init.sample(r.base_shape or r.shape, gen), None
    new = None
    # gathers first, in the source dtype: the float32 copy is then only as large as the output
    for axis, m in enumerate(r.axes):
        if m is None or m.index is None:
            continue
        t = t.index_select(axis, m.index.clamp(min=0))
        fresh = m.index < 0
        if fresh.any():
            fresh = fresh.view([-1 if k == axis else 1 for k in range(t.dim())])
            new = fresh if new is None else new | fresh
    t = t.to(torch.float32, copy=t is loaded)
    for axis, m in enumerate(r.axes):
        if m is not None and m.scale is not None:
            t.mul_(m.scale.to(torch.float32).view([-1 if k == axis else 1 for k in range(t.dim())]))
    if r.scale != 1.0:
        t.mul_(r.scale)
    if new is not None:
        t = torch.where(new, r.init.sample(t.shape, gen), t)
    if r.noise is not None:
        t.add_(zero_sum_noise(t, r.noise, gen))
    if tuple(t.shape) != tuple(r.shape):
        raise RuntimeError(f"recipe for {r.name} made shape {list(t.shape)}, expected {list(r.shape)}")
    return t.to(DTYPES[r.dtype])


def zero_sum_noise(t: torch.Tensor, noise: Noise, gen: torch.Generator) -> torch.Tensor:
    power = t.pow(2).mean().item()
    std = (power / 10 ** (noise.snr_db / 10)) ** 0.5
    n = torch.randn(t.shape, generator=gen) * std
    groups = noise.groups.long()
    ngroups = int(groups.max()) + 1
    moved = n.movedim(noise.axis, 0)
    sums = torch.zeros((ngroups, *moved.shape[1:])).index_add_(0, groups, moved)
    counts = torch.bincount(groups, minlength=ngroups).float().view(-1, *[1] * (moved.dim() - 1))
    moved -= (sums / counts)[groups]
    # centring a group of m removes 1/m of the variance; restore it so the SNR is the one asked for
    m = counts[groups]
    moved *= torch.where(m > 1, (m / (m - 1).clamp_min(1)).sqrt(), torch.zeros(()))
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

    @property
    def num_parameters(self) -> int:
        return sum(_numel(r.shape) for r in self.recipes)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.recipes)

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


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def execute(plan: Plan, source: Source, dst: Path, *, shard_size: int, force: bool = False,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Stream the plan into dst: read, build, write and free one tensor at a time."""
    dst = Path(dst)
    check_target(source.path, dst, force)
    hashes: dict[str, str] = {}
    hasher = threading.Thread(target=lambda: hashes.update(_hash_sources(source)), daemon=True)
    hasher.start()
    start = time.perf_counter()
    with atomic_folder(dst, force) as tmp:
        writer = ShardedWriter(tmp, [(r.name, r.dtype, r.shape) for r in plan.recipes], shard_size)
        done = 0
        for r in plan.recipes:
            t = materialize(r, source.get)
            writer.write(r.name, t)
            done += r.nbytes
            del t
            if progress:
                progress(done, plan.nbytes)
        files = writer.close()
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        for f in source.companion_files():
            shutil.copy2(f, tmp / f.name)
        for name, content in plan.extra_files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        hasher.join()
        record = plan.recipe_record(source)
        record["source"]["files"] = hashes
        record["target"]["files"] = files
        (tmp / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(plan, source))
    source.close()
    return {"seconds": time.perf_counter() - start, "files": files, "bytes": plan.nbytes}


def _hash_sources(source: Source) -> dict[str, str]:
    paths = [source.path / "config.json", *source.files]
    return {str(p.relative_to(source.path)): sha256_file(p) for p in paths}


PAST_TENSE = {"expand": "expanded", "shrink": "shrunk", "upcycle": "upcycled"}


def _model_card(plan: Plan, source: Source) -> str:
    rows = "\n".join(
        f"| {k} | {plan.source_sizes.get(k, '')} | {v} |" for k, v in plan.target_sizes.items()
    )
    exact = "function-preserving (check it with `grow verify`)" if plan.exact else "not function-preserving by design"
    notes = "".join(f"- {n}\n" for n in plan.notes)
    return (
        f"# {plan.architecture}, {PAST_TENSE.get(plan.operation, plan.operation + 'ed')} with grow\n\n"
        f"Made from `{source.id}` by `grow {plan.operation} --method {plan.method}` (grow {__version__}); "
        f"the result is {exact}. `grow.json` holds the full recipe and the source file hashes.\n\n"
        f"| size | source | target |\n|---|---|---|\n{rows}\n\n{notes}"
    )
