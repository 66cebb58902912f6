"""Weight subcloning (data-driven shrinking): keep the units the source uses most on real data.

Importance is the mean |activation| measured by grow.calibrate, one layer at a time: one global
ranking of the residual dims (the residual stream is shared by every layer), and per-layer rankings
of FFN units and heads (a kv group scores the sum of its query heads). Whole layers are removed by
block influence (those whose output is closest to their input, as ShortGPT), by skip loss (those
whose skipping moves the output least, measured: the default), or, with layer_removal="middle", from the middle. Each Linear whose input width shrank from D to d is multiplied by
sqrt(D/d), which keeps the scale of its output roughly where the source had it."""

from __future__ import annotations

import math

from .. import calibrate
from ..arch.view import ModelView
from ..errors import UsageError
from ..plan import Plan
from . import rotation
from .maps import WidthMap, select
from .shrinking import build_plan, head_indices, head_maps, target_sizes, top


def middle_removed(n: int, k: int) -> list[int]:
    """k of n layers: the first ceil(k/2) and the last floor(k/2)."""
    first = (k + 1) // 2
    return list(range(first)) + list(range(n - (k - first), n))


LAYER_REMOVAL = ("influence", "loss", "middle")
UNIT_RANKING = ("activation", "contribution")
RESIDUAL = ("pca", "activation")


def kept_layers(imp: calibrate.Importance, n: int, keep: int, how: str) -> list[int]:
    """The source layers kept: the `keep` of highest block influence or skip loss, or all but a middle run."""
    if how not in LAYER_REMOVAL:
        raise UsageError(f"--layer-removal {how} is not one of {', '.join(LAYER_REMOVAL)}.")
    if how == "middle" or keep == n:
        return middle_removed(n, keep)
    if how == "loss" and imp.skip_loss is None:
        raise UsageError("--layer-removal loss needs each layer's skip loss, which these scores lack; "
                         "measure them with grow.calibrate.importance(..., layer_loss=True).")
    return top(imp.influence if how == "influence" else imp.skip_loss, keep).tolist()


def build(view: ModelView, *, importance: calibrate.Importance, hidden=None, ffn=None, heads=None, kv_heads=None,
          layers=None, layer_removal: str | None = None, residual: str | None = None,
          unit_ranking: str = "activation", calibration=None,
          calibration_tokens=None, scores=None, seed: int = 0, dtype: str | None = None) -> Plan:
    """`importance` is measured by the caller (grow.api runs grow.calibrate), so that this builder
    stays a pure function; calibration, calibration_tokens and scores are only recorded."""
    s = view.sizes
    t = target_sizes(view, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers)
    imp = importance
    notes = [f"importance from {imp.inputs}"] + imp.notes
    layer_removal = layer_removal_method(view, layer_removal, notes if t["layers"] != s["layers"] else [])
    layer_src = kept_layers(imp, s["layers"], t["layers"], layer_removal)
    if unit_ranking not in UNIT_RANKING:
        raise UsageError(f"--unit-ranking {unit_ranking} is not one of {', '.join(UNIT_RANKING)}.")
    residual = residual_method(view, residual, notes if t["hidden"] != s["hidden"] else [])

    global_maps: dict[str, WidthMap] = {}
    if t["hidden"] != s["hidden"] and residual == "activation":
        global_maps["hidden"] = select(s["hidden"], top(imp.hidden, t["hidden"]), label=f"top {t['hidden']} of {s['hidden']}")
    # a rotated residual keeps its scale through the norm weights, not through its readers
    t_in = dict(t, hidden=s["hidden"]) if residual == "pca" else t

    def layer_maps(layer: int) -> dict[str, WidthMap]:
        maps = dict(global_maps)
        if t["ffn"] != s["ffn"]:
            maps["ffn"] = select(s["ffn"], top(imp.unit_scores(layer, "ffn", unit_ranking), t["ffn"]),
                                 label=f"top {t['ffn']} of {s['ffn']}")
        per_head = imp.head_scores(layer, s["head_dim"], unit_ranking)
        group = s["heads"] // s["kv_heads"]
        kv, q = head_indices(
            s, t,
            lambda _n, k: top(per_head.view(-1, group).sum(1), k),
            lambda g, _n, k: top(per_head[g * group:(g + 1) * group], k),
        )
        maps.update(head_maps(s, kv, q, "top"))
        return maps

    def fan_in_scale(spaces: tuple[str, ...]) -> float:
        before = view.spec.axis_size(spaces, s)
        after = view.spec.axis_size(spaces, t_in)
        return math.sqrt(before / after) if before and after and before != after else 1.0

    if t["layers"] != s["layers"]:
        measure = {"influence": ("the least influential removed", imp.influence),
                   "loss": ("those whose skipping costs least removed, KL", imp.skip_loss)}.get(layer_removal)
        why = ("removed from the middle" if measure is None else
               measure[0] + ": " + ", ".join(f"{i}: {float(measure[1][i]):.3g}"
                                            for i in range(s["layers"]) if i not in layer_src))
        notes.append(f"layers {layer_src} of {s['layers']} kept ({why})")
    plan = build_plan(
        view, t, method="subclone", layer_src=layer_src, layer_maps=layer_maps, global_maps=global_maps,
        fan_in_scale=fan_in_scale, dtype=dtype, seed=seed, notes=notes,
        options={"calibration": None if calibration is None else str(calibration), "calibration_tokens": imp.tokens,
                 "scores": None if scores is None else str(scores), "seed": seed, "dtype": dtype,
                 "layer_removal": layer_removal, "residual": residual, "unit_ranking": unit_ranking,
                 **{k: t[k] for k in ("hidden", "ffn", "heads", "kv_heads", "layers")}},
    )
    if t["hidden"] != s["hidden"] and residual == "pca":
        rotation.rotate(view, plan, imp.covariance, t["hidden"])
    return plan


def layer_removal_method(view: ModelView, asked: str | None, notes: list[str]) -> str:
    """loss (the default: measured best, see the README) where the output is a distribution, else influence."""
    if asked is not None:
        return asked
    if calibrate.outputs_distribution(view):
        return "loss"
    notes.append("layers removed by block influence: the output is hidden states, not a distribution to measure "
                 "a skip loss on")
    return "influence"


def residual_method(view: ModelView, asked: str | None, notes: list[str]) -> str:
    """pca where the family's residual can be rotated (the default), else the top dims by activation."""
    if asked is not None and asked not in RESIDUAL:
        raise UsageError(f"--residual {asked} is not one of {', '.join(RESIDUAL)}.")
    why_not = rotation.unsupported(view)
    if asked == "pca" and why_not:
        raise UsageError(f"--residual pca cannot rotate this model's residual stream: {why_not}; "
                         "use --residual activation.")
    if asked is None and why_not:
        notes.append(f"residual cut by activation, not rotated: {why_not}")
    return asked or ("activation" if why_not else "pca")
