"""LEMON: grow width to any size and depth to any count, so that the grown model computes exactly what
the source did.

The residual vector becomes k copies of x plus r extra entries (D = k d + r): zeros under RMSNorm,
mean(x) under LayerNorm, all times sqrt(D / k d) so that its mean square, and thus the weight of eps,
stays as it was; the normalized vector is [y, ..., y, 0] once the norm weights carry sqrt(k d / D). Readers of a copied space split each source weight element-wise into random
pieces that sum to it exactly (as the LEMON reference does; the copies' gradients differ from the first
step), or with split="column" each whole column into unequal scalar multiples (gradients start parallel);
columns reading the extra entries are free. New layers are
copies whose residual writers are zero, so each new block starts as the identity.

Post-LN (BERT): the norm after each residual add is the residual stream, and its output cannot hold
mean(x) in extra entries, so the hidden width grows by whole multiples only. A new layer takes over the
closing norm of the layer before it, which becomes the identity; see _hands_on."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..arch.spec import NORM_ROLES
from ..arch.view import Entry, ModelView
from ..errors import UsageError
from ..plan import Init, Plan, TensorRecipe
from .base import depth_config, mapped_recipe, output_dtype, target_config, tensor_seed
from .growth import (SPLIT_SNR_DB, grouped_heads, spread_layers, stage_depths, symmetry_breaking, target_sizes,
                     unequal_split)
from .maps import WidthMap, per_head

FREE_STD = 0.02  # columns that read the always-zero extra residual entries: any value is exact
SPLITS = ("element", "column")


def build(view: ModelView, *, hidden=None, ffn=None, heads=None, kv_heads=None, layers=None, split: str = "element",
          noise_snr_db: float | None = None, seed: int = 0, dtype: str | None = None) -> Plan:
    if split not in SPLITS:
        raise UsageError(f"--split {split} is not one of {', '.join(SPLITS)}.")
    if split == "column" and noise_snr_db is not None:
        raise UsageError("--noise-snr-db sets the element-wise split; it does not apply to split='column'.")
    snr = (SPLIT_SNR_DB if noise_snr_db is None else noise_snr_db) if split == "element" else None
    if view.spec.block not in ("pre_norm", "post_norm"):
        raise UsageError(f"--method lemon needs a pre-LN or post-LN model; {view.architecture} is {view.spec.block}.")
    post_norm = view.spec.block == "post_norm"
    s = view.sizes
    if view.spec.stages:  # each stage has its own width: LEMON grows the depth of their residual blocks
        t = stage_depths(view, "lemon", layers, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads)
    else:
        t = target_sizes(view, "lemon", hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers)
    gains = _whole_projection_gains(view, s, t)
    d = D = 1  # a staged model keeps every width
    if "hidden" in s:
        d, D = s["hidden"], t["hidden"]
    copies, extra = divmod(D, d)
    if post_norm and extra:
        raise UsageError(
            f"--hidden {D} is not a multiple of the source's {d}: in a post-LN model ({view.architecture}) the "
            "LayerNorm output is the residual stream and cannot hold the mean of x that extra entries need; "
            f"grow the hidden width by whole multiples, e.g. --hidden {(copies + 1) * d}.")
    if extra and view.spec.norm == "layer" and any(e.spec.role == "layer_scale" for e in view.entries):
        lo = f"{copies * d} or " if copies > 1 else ""
        raise UsageError(f"--hidden {D} is not a multiple of the source's {d}: LEMON fills the extra residual entries "
                         "with the mean of the others, which the per-channel layer scale of this model does not keep; "
                         f"use --hidden {lo}{(copies + 1) * d}.")
    share = copies * d / D  # fraction of the residual entries that hold copies of x

    sources = {}  # space -> source position of each target position (-1: new)
    if D != d:
        sources["hidden"] = torch.cat([torch.arange(d).repeat(copies), torch.full((extra,), -1)])
    if t.get("ffn") != s.get("ffn"):
        sources["ffn"] = torch.arange(t["ffn"]) % s["ffn"]
    if t.get("heads") != s.get("heads"):
        head_src, kv_src = grouped_heads(s["heads"], s["kv_heads"], t["kv_heads"], whole_copies=bool(gains))
        sources["q"], sources["kv"] = head_src, kv_src

    def maps_for(name: str) -> dict[str, WidthMap]:
        # every tensor splits its fan-in differently, so no two copies see the same weights
        gen = torch.Generator().manual_seed(tensor_seed(seed, name))
        maps = {}
        for space, src in sources.items():
            fan_in = unequal_split(src, gen) if space != "kv" and split == "column" else torch.ones(src.numel())
            if space in ("q", "kv"):
                maps[space] = per_head(WidthMap(src, fan_in, f"{len(src)} heads, circular copies"), s["head_dim"])
            else:
                label = f"{copies} copies + {extra} new" if space == "hidden" else "circular copies"
                maps[space] = WidthMap(src, fan_in, label)
        return maps

    plans = {group: spread_layers(s[group], t[group]) for group in view.spec.layer_groups}
    recipes = []
    for e in view.globals():
        if e.spec.role == "head" and view.tied:
            continue  # the tie is kept; the 1/k it needs lives in the final norm
        recipes.append(_recipe(view, e, maps_for(e.name), e.name, copies, share, extra, seed, dtype, snr, gains,
                               new_layer=False))
    for group, layer_plan in plans.items():
        for i, (j, new) in enumerate(layer_plan):
            followed_by_new = i + 1 < len(layer_plan) and layer_plan[i + 1][1]
            for e in view.layer(j, group):
                name = e.spec.name(i)
                if post_norm and _hands_on(e, new, followed_by_new):
                    recipes.append(_identity_norm(view, e, name, t, dtype))
                else:
                    recipes.append(_recipe(view, e, maps_for(name), name, copies, share, extra, seed, dtype, snr,
                                           gains, new_layer=new))

    config = depth_config(view, target_config(view, t, dtype), [j for j, _ in plans.get("layers", [])])
    how, note = symmetry_breaking(snr, column_split=split == "column")
    if all(t[k] == s[k] for k in t if not k.startswith("layers")):  # depth only: no unit has a copy beside it
        how, note = "none needed", None
    notes = [note] * (note is not None) + [
        f"{t[group] - s[group]} new layers{view.spec.layers_label(group)} (copies with zero residual writers) among "
        f"the {s[group]} source layers: target layer i comes from source layer "
        f"{[j if not new else f'{j}*' for j, new in layer_plan]} (* new)."
        for group, layer_plan in plans.items() if t[group] != s[group]]
    if post_norm and t["layers"] != s["layers"]:
        notes.append("post-LN: the closing LayerNorm of the layer before a new one becomes the identity (weight 1, "
                     "bias 0) and the new layer's own norms take over from it, so the new layer renormalizes an "
                     "already normalized vector: exact up to a relative error of about the LayerNorm eps.")
    return Plan(
        operation="expand", method="lemon", exact=True, architecture=view.architecture, config=config,
        recipes=recipes, source_sizes=s, target_sizes=t, notes=notes, stats={"symmetry_breaking": how},
        options={**{k: t[k] for k in ("hidden", "ffn", "heads", "kv_heads", "layers") if k in t},
                 **({"layers": [t[g] for g in plans]} if view.spec.stages else {}),  # one depth per stage
                 "split": split, "noise_snr_db": snr, "seed": seed, "dtype": dtype},
    )


def _whole_projection_gains(view: ModelView, s: dict, t: dict) -> dict[str, float]:
    """A q/k norm over the whole projection (OLMo-2) keeps its statistics when every head is copied equally
    often. Otherwise the heads are copied k whole times and the rest are new heads whose queries and keys
    are 0 (their output projection columns are 0 too, so they add nothing); the projection that the norm
    normalises is multiplied by g = sqrt(new heads / (k x old heads)), which keeps its mean square (and with
    it eps), and the norm's weight by 1/g. Returns tensor pattern -> g (and 1/g); empty when not needed."""
    if t.get("heads") == s.get("heads") or t["heads"] % s["heads"] == 0:
        return {}
    gains = {}
    g = math.sqrt(t["heads"] / (t["heads"] // s["heads"] * s["heads"]))
    for spec in view.spec.by_role("qk_norm"):
        if spec.axes[0][0] in ("q", "kv"):
            if spec.normalises is None:
                raise UsageError(f"--method lemon cannot grow {s['heads']} heads to {t['heads']} exactly: "
                                 f"{spec.pattern} normalises all heads together; use a multiple of {s['heads']}.")
            gains[spec.pattern] = 1 / g
            gains[spec.normalises + ".weight"] = gains[spec.normalises + ".bias"] = g
    return gains


def _recipe(view: ModelView, e: Entry, maps, name: str, copies: int, share: float, extra: int, seed: int,
            dtype, snr: float | None, gains: dict[str, float], *, new_layer: bool):
    role = e.spec.role
    is_bias = e.name.endswith("bias")
    if role in NORM_ROLES:
        init = Init("zeros" if is_bias else "ones")
    else:
        init = Init("zeros") if e.spec.writes_residual else Init("normal", FREE_STD)
    scale, notes = 1.0, []
    if e.spec.writes_residual and share != 1.0:
        scale = 1 / math.sqrt(share)
        notes.append("x sqrt(D/kd): residual keeps its mean square")
    if role in ("norm", "final_norm") and not is_bias and share != 1.0:
        scale = math.sqrt(share)
        notes.append("x sqrt(kd/D): same normalized copies")
    if role == "final_norm" and view.tied and (copies > 1 or share != 1.0):
        scale *= math.sqrt(share) / copies
        notes.append("1/k of the tied head (and its sqrt(D/kd)) folded in")
    if e.spec.pattern in gains:
        scale *= gains[e.spec.pattern]
        notes.append(f"x {gains[e.spec.pattern]:.6g}: the whole-projection norm keeps its statistics")
        if e.spec.role != "qk_norm":
            init = Init("zeros")  # new heads: queries and keys 0
    if view.spec.branch_input == "residual" and e.layer is not None and share != 1.0 and e.spec.reads is not None \
            and e.spec.axes[e.spec.reads] == ("hidden",):
        scale *= math.sqrt(share)  # no norm in front of the branch to carry it
        notes.append("x sqrt(kd/D): reads the residual itself")
    if new_layer:
        # a branch whose output is normalised writes nothing when that norm's weight is 0 (its input can stay:
        # zeroing what a norm reads would make its gradient 1/sqrt(eps) large)
        post_normed = bool(view.spec.by_role("post_norm"))
        if role == "post_norm" or (e.spec.writes_residual and not post_normed):
            scale, notes = 0.0, ["new layer: writes nothing to the residual"]
    note = "; ".join(notes)
    r = mapped_recipe(view, e, maps, name=name, dtype=dtype, seed=seed, scale=scale, init=init, note=note,
                      split_snr_db=snr)
    if extra and view.spec.norm == "layer" and e.spec.writes_residual:
        # average expansion: the extra residual entries hold mean(x), which LayerNorm centres to zero
        d = view.sizes["hidden"]
        mix = (torch.arange(copies * d, copies * d + extra), torch.full((extra, d), 1.0 / d))
        r.axes = tuple(
            dataclasses.replace(a, mix=mix, label=a.label + ", mean in the new")
            if a is not None and e.spec.axes[k] == ("hidden",) and k != e.spec.reads else a
            for k, a in enumerate(r.axes)
        )
    return r


def _hands_on(e: Entry, new_layer: bool, followed_by_new: bool) -> bool:
    """Post-LN depth: which norms become the identity. A layer followed by a new layer hands its closing
    norm on (the new layer's closing norm carries it) and outputs the bare normalized vector y; a new
    layer, whose writers are zero, must then pass y through its inner norms unchanged (LN(y) = y up to
    eps, since y already has mean 0 and variance 1)."""
    if e.spec.role != "norm":
        return False
    return followed_by_new if e.spec.closes_block else new_layer


def _identity_norm(view: ModelView, e: Entry, name: str, sizes: dict[str, int], dtype) -> TensorRecipe:
    init = Init("zeros" if e.name.endswith("bias") else "ones")
    note = ("identity: its closing norm moves to the new layer after it" if e.spec.closes_block
            else "identity: a new layer passes the normalized vector on")
    return TensorRecipe(name=name, shape=view.expected_shape(e.spec, e.info.shape, sizes),
                        dtype=output_dtype(dtype, e.info.dtype), init=init, note=note)
