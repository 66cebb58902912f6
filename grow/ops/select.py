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
from .shrinking import build_plan, head_indices, head_maps, pick, stage_sizes, target_sizes

LAYER_SELECTIONS = ("first", "uniform")
ELEMENT_SELECTIONS = ("uniform", "first", "random")


def layer_indices(n: int, k: int, how: str) -> list[int]:
    if how == "first":
        return list(range(k))
    if how == "uniform":  # evenly spaced, first and last layer kept
        return torch.linspace(0, n - 1, k).round().long().tolist() if k > 1 else [0]
    raise UsageError(f"--layer-selection {how} is not one of {', '.join(LAYER_SELECTIONS)}.")


def build(view: ModelView, *, hidden=None, ffn=None, heads=None, kv_heads=None, layers=None, experts=None,
          layer_selection: str = "first", element_selection: str = "uniform", seed: int = 0,
          dtype: str | None = None) -> Plan:
    if element_selection not in ELEMENT_SELECTIONS:
        raise UsageError(f"--element-selection {element_selection} is not one of {', '.join(ELEMENT_SELECTIONS)}.")
    s = view.sizes
    if view.spec.stages:
        t = stage_sizes(view, hidden=hidden, layers=layers, ffn=ffn, heads=heads, kv_heads=kv_heads)
        return _staged(view, t, layer_selection, element_selection, seed, dtype)
    moe = "experts" in s
    if experts is not None and not moe:
        raise UsageError(f"--experts applies to a mixture of experts; a {view.architecture} source has none.")
    if ffn is not None and moe:
        raise UsageError(f"--ffn does not apply to a {view.architecture} source: its FFN widths are the experts'; "
                         "keep fewer experts with --experts instead.")
    t = target_sizes(view, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers,
                     **({"experts": experts} if experts is not None or moe else {}))
    if moe:
        _check_top_k(view, t["experts"])
    layer_src = layer_indices(s["layers"], t["layers"], layer_selection)
    gen = torch.Generator().manual_seed(seed)
    how = element_selection

    maps = {}
    for space in ("hidden", "ffn", "experts"):  # router rows are selected with the experts they route to
        if space in t and t[space] != s[space]:
            maps[space] = select(s[space], pick(s[space], t[space], how, gen), label=f"{how} {t[space]} of {s[space]}")
    kv, q = head_indices(s, t, lambda n, k: pick(n, k, how, gen), lambda _g, n, k: pick(n, k, how, gen))
    maps.update(head_maps(s, kv, q, how))
    expert_src = maps["experts"].src.tolist() if "experts" in maps else None

    notes = [f"layers {layer_src} of {s['layers']} kept ({layer_selection})"] if t["layers"] != s["layers"] else []
    if expert_src is not None:
        notes.append(f"experts {expert_src} of {s['experts']} kept ({how}), with their router rows")
    return build_plan(
        view, t, method="select", layer_src=layer_src, layer_maps=lambda _layer: maps, global_maps=maps,
        dtype=dtype, seed=seed, notes=notes, expert_src=expert_src,
        options={"layer_selection": layer_selection, "element_selection": element_selection, "seed": seed,
                 "dtype": dtype, **{k: t[k] for k in ("hidden", "ffn", "heads", "kv_heads", "layers", "experts") if k in t}},
    )


def _check_top_k(view: ModelView, experts: int) -> None:
    """Each token still needs as many experts as it used: the config's top-k must fit in what is kept."""
    key, top_k = view.spec.sizes["top_k"].key, view.sizes["top_k"]
    if experts < top_k:
        raise UsageError(f"--experts {experts} is fewer than the {top_k} experts each token uses ({key} in config.json); "
                         f"keep at least {top_k}.")


def _staged(view: ModelView, t: dict[str, int], layer_selection: str, how: str, seed: int, dtype) -> Plan:
    """A model built of stages: one index set per stage width and FFN width (the downsampling layer into
    a stage reads the stage before with that stage's set), layers chosen stage by stage."""
    s, gen = view.sizes, torch.Generator().manual_seed(seed)
    maps = {space: select(s[space], pick(s[space], t[space], how, gen), label=f"{how} {t[space]} of {s[space]}")
            for kind in ("hidden", "ffn") for space in view.spec.spaces_of(kind) if t[space] != s[space]}
    layer_src = {g: layer_indices(s[g], t[g], layer_selection) for g in view.spec.layer_groups}
    notes = [f"layers {src} of {s[g]}{view.spec.layers_label(g)} kept ({layer_selection})"
             for g, src in layer_src.items() if t[g] != s[g]]
    return build_plan(
        view, t, method="select", layer_src=layer_src, layer_maps=lambda _layer: maps, global_maps=maps,
        dtype=dtype, seed=seed, notes=notes,
        options={"layer_selection": layer_selection, "element_selection": how, "seed": seed, "dtype": dtype,
                 **{kind: [t[k] for k in view.spec.spaces_of(kind)] for kind in ("hidden", "layers")}},
    )
