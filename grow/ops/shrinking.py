"""What the shrinking operators share: target sizes and their constraints, head and layer index sets,
and the plan that gathers every tensor through one map per space."""

from __future__ import annotations

from typing import Callable

import torch

from ..arch.view import ModelView
from ..errors import UsageError
from ..plan import Plan
from .base import SIZE_OPTIONS as OPTIONS
from .base import check_heads, check_size_rules, depth_config, mapped_recipe, target_config, whole_number
from .growth import proportional
from .maps import WidthMap, per_head, select


def target_sizes(view: ModelView, **asked) -> dict[str, int]:
    """The target sizes: each size asked for (no larger than the source), the rest as they are.
    Heads stay whole (head_dim is kept) and every target kv head keeps query heads of one source group."""
    s = view.sizes
    given = {k: v for k, v in asked.items() if v is not None}
    if not given:
        raise UsageError(f"nothing to shrink: give at least one of {', '.join(OPTIONS.values())}.")
    t = dict(s)
    for key, value in given.items():
        option = OPTIONS.get(key, f"--{key}")  # --experts, for a mixture of experts
        t[key] = whole_number(value, option, 1, "; shrinking cannot make a size larger than the source's", most=s[key])
    kv_implied = view.spec.sizes["kv_heads"].key is None
    if kv_implied:  # every head has its own k and v (GPT-2, ViT): kv heads are the heads
        if "kv_heads" in given and given["kv_heads"] != t["heads"]:
            raise UsageError(f"--kv-heads does not apply to a {view.spec.family} model: each head has its own keys "
                             "and values, so the kv heads follow --heads.")
        t["kv_heads"] = t["heads"]
    hd = s["head_dim"]
    if view.spec.sizes["head_dim"].key is None and t["hidden"] != t["heads"] * hd:
        # head width is hidden / heads here, and shrinking keeps whole heads of hd dims
        if t["hidden"] % hd:
            raise UsageError(f"--hidden {t['hidden']} is not a multiple of the head size {hd}; a {view.spec.family} "
                             "model's heads are hidden / heads wide and shrinking keeps whole heads.")
        raise UsageError(f"a {view.spec.family} model's heads are hidden / heads wide and shrinking keeps whole heads "
                         f"of {hd}, so --hidden {t['hidden']} needs --heads {t['hidden'] // hd}, not {t['heads']}.")
    if t["kv_heads"] > s["kv_heads"]:
        raise UsageError(f"--kv-heads must be at most the source's {s['kv_heads']}, not {t['kv_heads']}.")
    check_heads(view, t)
    check_size_rules(view, t, grow=False)
    group, new_group = s["heads"] // s["kv_heads"], t["heads"] // t["kv_heads"]
    if new_group > group:
        raise UsageError(
            f"--heads {t['heads']} over {t['kv_heads']} kv heads puts {new_group} query heads on each kv head, but a "
            f"source kv head serves only {group}; keep --heads at most {group * t['kv_heads']} (whole kv groups)."
        )
    return t


def stage_sizes(view: ModelView, *, hidden=None, layers=None, **others) -> dict[str, int]:
    """Target sizes of a model built of stages (ConvNeXt): `hidden` is the first stage's new width, every
    stage's width scaled by the same ratio (or one width per stage); `layers` the new total depth, taken
    from the stages in proportion to their depths, each keeping one (or one depth per stage). The FFN
    widths follow their stage's width, as the framework fixes them."""
    given = [k for k, v in others.items() if v is not None]
    if given:
        raise UsageError(f"{OPTIONS[given[0]]} does not apply to a {view.architecture} checkpoint: its stages have "
                         "widths (--hidden) and depths (--layers), and each FFN is a fixed multiple of its stage's width.")
    if hidden is None and layers is None:
        raise UsageError("nothing to shrink: give --hidden (the first stage's width) or --layers (the total depth).")
    s, spec = view.sizes, view.spec
    t = dict(s)
    for option, value, names in (("--hidden", hidden, spec.spaces_of("hidden")), ("--layers", layers, spec.layer_groups)):
        if value is None:
            continue
        source = [s[n] for n in names]
        if isinstance(value, (list, tuple)):
            if len(value) != len(names):
                raise UsageError(f"{option} needs one value for each of the {len(names)} stages, not {list(value)}.")
            new = [whole_number(v, option, 1, "; shrinking cannot make a stage larger than the source's", most=n)
                   for v, n in zip(value, source)]
        elif option == "--hidden":
            first = whole_number(value, option, 1, "; shrinking cannot make a width larger than the source's",
                                 most=source[0])
            if any(n * first % source[0] for n in source):
                raise UsageError(f"--hidden {first} scales the stage widths {source} by {first}/{source[0]}, which "
                                 "leaves some of them fractional; give one width per stage instead.")
            new = [n * first // source[0] for n in source]
        else:
            total = whole_number(value, option, len(source), most=sum(source),
                                 hint=f"; every one of the {len(source)} stages keeps at least one layer")
            new = proportional(source, total, least=1)
        t.update(zip(names, new))
    for name in spec.ffn_spaces:
        t[name] = spec.implied(name, t)
    return t


def head_indices(s: dict[str, int], t: dict[str, int], pick_kv: Callable[[int, int], torch.Tensor],
                 pick_q: Callable[[int, int, int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Source kv heads kept, and source query heads kept: for each kept kv head, query heads of its own
    group, so that target query head j still reads target kv head j // (heads / kv_heads).
    pick_kv(n, k) chooses k of n kv heads; pick_q(kv_head, n, k) chooses k of the n heads of that group."""
    group, keep = s["heads"] // s["kv_heads"], t["heads"] // t["kv_heads"]
    kv = pick_kv(s["kv_heads"], t["kv_heads"])
    q = torch.cat([int(g) * group + pick_q(int(g), group, keep) for g in kv])
    return kv, q


def head_maps(s: dict[str, int], kv: torch.Tensor, q: torch.Tensor, how: str) -> dict[str, WidthMap]:
    maps = {}
    if q.numel() != s["heads"]:
        maps["q"] = per_head(select(s["heads"], q, label=f"{how} {q.numel()} of {s['heads']} heads"), s["head_dim"])
    if kv.numel() != s["kv_heads"]:
        maps["kv"] = per_head(select(s["kv_heads"], kv, label=f"{how} {kv.numel()} of {s['kv_heads']} kv heads"),
                              s["head_dim"])
    return maps


def build_plan(view: ModelView, t: dict[str, int], *, method: str, layer_src: list[int] | dict[str, list[int]],
               layer_maps: Callable[[int], dict[str, WidthMap]], global_maps: dict[str, WidthMap],
               fan_in_scale: Callable[[tuple[str, ...]], float] = lambda spaces: 1.0, dtype: str | None, seed: int,
               options: dict, notes: list[str], expert_src: list[int] | None = None) -> Plan:
    """Target layer i copies source layer layer_src[i] (in staged models, {layer count: layer_src} stage by
    stage), every axis gathered through its space's map;
    each Linear is multiplied by fan_in_scale(spaces of its input axis). A tied head keeps its tie:
    its scale goes into the final norm that feeds it. Target expert k copies source expert expert_src[k]."""
    groups = layer_src if isinstance(layer_src, dict) else {"layers": layer_src}
    target_of = {(group, j): i for group, src in groups.items() for i, j in enumerate(src)}
    expert_of = {j: k for k, j in enumerate(expert_src)} if expert_src is not None else None
    heads = view.spec.by_role("head")
    head_scale = fan_in_scale(heads[0].axes[heads[0].reads]) if view.tied and heads else 1.0
    recipes = []
    for e in view.entries:
        role = e.spec.role
        if role == "head" and view.tied:
            continue
        if e.layer is None:
            maps, name = global_maps, e.name
        elif (e.spec.layer_size, e.layer) in target_of and (e.expert is None or expert_of is None or e.expert in expert_of):
            expert = e.expert if e.expert is None or expert_of is None else expert_of[e.expert]
            maps, name = layer_maps(e.layer), e.spec.name(target_of[(e.spec.layer_size, e.layer)], expert)
        else:
            continue
        scale = fan_in_scale(e.spec.axes[e.spec.reads]) if e.spec.reads is not None else 1.0
        note = ""
        if role == "final_norm" and head_scale != 1.0:
            scale, note = head_scale, "scale of the tied head folded in"
        if name != e.name:
            note = ", ".join(filter(None, [f"from layer {e.layer}", note]))
        recipes.append(mapped_recipe(view, e, maps, name=name, dtype=dtype, seed=seed, scale=scale, note=note))
    config = depth_config(view, target_config(view, t, dtype), groups.get("layers", []))
    return Plan(operation="shrink", method=method, exact=False, architecture=view.architecture, config=config,
                recipes=recipes, source_sizes=view.sizes, target_sizes=t, options=options, notes=notes)


def pick(n: int, k: int, how: str, gen: torch.Generator) -> torch.Tensor:
    """k of n positions, in order: evenly spaced, the first k, or a seeded random choice."""
    if how == "first":
        return torch.arange(k)
    if how == "uniform":
        return torch.arange(k) * n // k
    if how == "random":
        return torch.randperm(n, generator=gen)[:k].sort().values
    raise UsageError(f"--element-selection {how} is not one of uniform, first, random.")


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring positions, in their original order."""
    return torch.topk(scores.double(), k).indices.sort().values
