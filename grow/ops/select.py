"""Weight selection (data-free shrinking): keep a subset of every space, the same subset in every tensor.

One index set per space (hidden, FFN units, heads, kv heads) is applied to every tensor with that
space, so the kept units still meet the weights they met in the source. Heads and kv groups are kept
whole, the vocabulary is never cut, and nothing is rescaled. Layers: the first N, or evenly spaced."""

from __future__ import annotations

import torch

from ..arch.view import ModelView
from ..errors import UsageError
from ..plan import Plan
from .maps import select
from .shrinking import build_plan, head_indices, head_maps, pick, target_sizes

LAYER_SELECTIONS = ("first", "uniform")
ELEMENT_SELECTIONS = ("uniform", "first", "random")


def layer_indices(n: int, k: int, how: str) -> list[int]:
    if how == "first":
        return list(range(k))
    if how == "uniform":  # evenly spaced, first and last layer kept
        return torch.linspace(0, n - 1, k).round().long().tolist() if k > 1 else [0]
    raise UsageError(f"--layer-selection {how} is not one of {', '.join(LAYER_SELECTIONS)}.")


def build(view: ModelView, *, hidden=None, ffn=None, heads=None, kv_heads=None, layers=None,
          layer_selection: str = "first", element_selection: str = "uniform", seed: int = 0,
          dtype: str | None = None) -> Plan:
    if element_selection not in ELEMENT_SELECTIONS:
        raise UsageError(f"--element-selection {element_selection} is not one of {', '.join(ELEMENT_SELECTIONS)}.")
    s = view.sizes
    t = target_sizes(view, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers)
    layer_src = layer_indices(s["layers"], t["layers"], layer_selection)
    gen = torch.Generator().manual_seed(seed)
    how = element_selection

    maps = {}
    if t["hidden"] != s["hidden"]:
        maps["hidden"] = select(s["hidden"], pick(s["hidden"], t["hidden"], how, gen), label=f"{how} {t['hidden']} of {s['hidden']}")
    if t["ffn"] != s["ffn"]:
        maps["ffn"] = select(s["ffn"], pick(s["ffn"], t["ffn"], how, gen), label=f"{how} {t['ffn']} of {s['ffn']}")
    kv, q = head_indices(s, t, lambda n, k: pick(n, k, how, gen), lambda _g, n, k: pick(n, k, how, gen))
    maps.update(head_maps(s, kv, q, how))

    notes = [f"layers {layer_src} of {s['layers']} kept ({layer_selection})"] if t["layers"] != s["layers"] else []
    return build_plan(
        view, t, method="select", layer_src=layer_src, layer_maps=lambda _layer: maps, global_maps=maps,
        dtype=dtype, seed=seed, notes=notes,
        options={"layer_selection": layer_selection, "element_selection": element_selection, "seed": seed,
                 "dtype": dtype, **{k: t[k] for k in ("hidden", "ffn", "heads", "kv_heads", "layers")}},
    )
