"""Width maps: for each target position of a space, the source position it copies and its fan-in weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WidthMap:
    src: torch.Tensor  # long [target]: source position copied, -1 for a new position
    fan_in: torch.Tensor  # float [target]: weight of this position when it is read as an input
    label: str = ""

    @property
    def size(self) -> int:
        return int(self.src.numel())

    def groups(self) -> torch.Tensor:
        """Group id per target position: positions copying the same source position share one."""
        _, inverse = torch.unique(self.src, return_inverse=True)
        return inverse

    def copy_groups(self) -> torch.Tensor:
        """Group id per target position that shares its source position with another; -1 elsewhere
        (new positions, positions copied once)."""
        _, inverse, counts = torch.unique(self.src, return_inverse=True, return_counts=True)
        shared = (self.src >= 0) & (counts[inverse] > 1)
        _, ids = torch.unique(inverse[shared], return_inverse=True)
        out = torch.full_like(self.src, -1)
        out[shared] = ids
        return out


def identity(n: int) -> WidthMap:
    return WidthMap(torch.arange(n), torch.ones(n), "")


def tile(n: int, factor: int) -> WidthMap:
    """[0..n-1] repeated `factor` times; each copy read with weight 1/factor."""
    return WidthMap(torch.arange(n).repeat(factor), torch.full((n * factor,), 1.0 / factor), f"tile x{factor}")


def select(n: int, keep: torch.Tensor, fan_in: float = 1.0, label: str = "") -> WidthMap:
    keep = torch.as_tensor(keep, dtype=torch.long)
    if keep.numel() and (keep.min() < 0 or keep.max() >= n):
        raise ValueError("selected positions outside the source")
    return WidthMap(keep, torch.full((keep.numel(),), float(fan_in)), label or f"select {keep.numel()} of {n}")


def per_head(head_map: WidthMap, head_dim: int) -> WidthMap:
    """Lift a map over whole heads to the elements (head x head_dim) that the weights index."""
    offs = torch.arange(head_dim)
    src = head_map.src.repeat_interleave(head_dim) * head_dim + offs.repeat(head_map.size)
    src[head_map.src.repeat_interleave(head_dim) < 0] = -1
    return WidthMap(src, head_map.fan_in.repeat_interleave(head_dim), head_map.label + " (heads)" if head_map.label else "")


def concat(maps: list[WidthMap], source_sizes: list[int]) -> WidthMap:
    """The map of a fused axis (e.g. q|k|v) from the maps of its parts."""
    srcs, fans, offset = [], [], 0
    for m, n in zip(maps, source_sizes):
        srcs.append(torch.where(m.src >= 0, m.src + offset, m.src))
        fans.append(m.fan_in)
        offset += n
    labels = [m.label for m in maps if m.label]
    return WidthMap(torch.cat(srcs), torch.cat(fans), " | ".join(labels))


def interleave(maps: list[WidthMap], head_dim: int) -> WidthMap:
    """The map of a fused axis stored head by head ([head 0: q, k, v], [head 1: ...], GPT-NeoX) from the
    maps of its parts, which must index the same number of heads before and after."""
    parts = len(maps)
    src = torch.stack([m.src for m in maps])  # [part, target heads x head_dim]
    head, within = src.div(head_dim, rounding_mode="floor"), src.remainder(head_dim)
    part = torch.arange(parts).view(-1, 1)
    fused = torch.where(src >= 0, (head * parts + part) * head_dim + within, src)

    def by_head(t: torch.Tensor) -> torch.Tensor:
        return t.view(parts, -1, head_dim).transpose(0, 1).reshape(-1)

    labels = [m.label for m in maps if m.label]
    return WidthMap(by_head(fused), by_head(torch.stack([m.fan_in for m in maps])),
                    (labels[0] + " (interleaved per head)") if labels else "")
