"""MSG (masked structural growth): grow any dimension with ordinarily initialised new parts whose
contribution a mask alpha multiplies, ramped from 0 to 1 during training, one growth at a time.

The weights alone do not reproduce the source; with the masks (written to msg_masks.json and applied
by grow.runtime) at alpha = 0 they do. New units, heads and hidden entries are appended after the
source's; new layers are spread among the source layers."""

from __future__ import annotations

import torch

from ..arch.spec import NORM_ROLES, TensorSpec
from ..arch.view import Entry, ModelView
from ..errors import UsageError
from ..plan import Init, Plan, TensorRecipe
from ..runtime.masks import MASKS_FILE
from .base import depth_config, mapped_recipe, output_dtype, target_config, tensor_seed, whole_number
from .growth import appended, spread_layers, target_sizes
from .maps import WidthMap, per_head

INIT_STD = 0.02
DEFAULT_RAMP_STEPS = 1000
# The hidden-width masks sit on the norms themselves (statistics over the old entries, new outputs times
# alpha), so they hold whether a norm reads the residual (pre-LN) or is the residual (post-LN, after the add).
MASKABLE_BLOCKS = ("pre_norm", "post_norm")


def build(view: ModelView, *, hidden=None, ffn=None, heads=None, kv_heads=None, layers=None,
          ramp_steps: int = DEFAULT_RAMP_STEPS, seed: int = 0, dtype: str | None = None) -> Plan:
    ramp_steps = whole_number(ramp_steps, "--ramp-steps")
    if view.spec.block not in MASKABLE_BLOCKS:
        raise UsageError(f"--method msg needs a pre-LN or post-LN model; {view.architecture} is {view.spec.block}.")
    s = view.sizes
    t = target_sizes(view, "msg", hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers)
    maps: dict[str, WidthMap] = {}
    for space in ("hidden", "ffn"):
        if t[space] != s[space]:
            maps[space] = WidthMap(appended(s[space], t[space]), torch.ones(t[space]), f"{t[space] - s[space]} new")
    if t["heads"] != s["heads"]:
        for space, count in (("q", "heads"), ("kv", "kv_heads")):
            head_map = WidthMap(appended(s[count], t[count]), torch.ones(t[count]), f"{t[count] - s[count]} new heads")
            maps[space] = per_head(head_map, s["head_dim"])

    layer_plan = spread_layers(s["layers"], t["layers"])
    recipes = [mapped_recipe(view, e, maps, dtype=dtype, seed=seed, init=_init(e.spec)) for e in view.globals()
               if not (e.spec.role == "head" and view.tied)]  # a tied head is the embedding, stored once
    for i, (j, new) in enumerate(layer_plan):
        for e in view.layer(j):
            name = e.spec.name(i)
            if new:
                recipes.append(_fresh(view, e, name, t, seed, dtype))
            else:
                recipes.append(mapped_recipe(view, e, maps, name=name, dtype=dtype, seed=seed, init=_init(e.spec)))

    masks = _masks(view, s, t, [i for i, (_, new) in enumerate(layer_plan) if new], ramp_steps)
    order = ", ".join(dict.fromkeys(g["dimension"] for g in masks["growths"]))
    return Plan(
        operation="expand", method="msg", exact=True, architecture=view.architecture,
        config=depth_config(view, target_config(view, t, dtype), [j for j, _ in layer_plan]), recipes=recipes,
        source_sizes=s, target_sizes=t, extra_files={MASKS_FILE: masks},
        options={"hidden": t["hidden"], "ffn": t["ffn"], "heads": t["heads"], "kv_heads": t["kv_heads"],
                 "layers": t["layers"], "ramp_steps": ramp_steps, "seed": seed, "dtype": dtype},
        notes=[f"exact only with the masks of {MASKS_FILE} at alpha = 0 (grow.runtime attaches them; grow verify "
               f"does it itself); training ramps alpha to 1 over {ramp_steps} steps per growth, in the order {order}."],
    )


def _init(spec: TensorSpec) -> Init:
    if spec.pattern.endswith("bias"):
        return Init("zeros")
    if spec.role in NORM_ROLES:
        return Init("ones")
    return Init("normal", INIT_STD)


def _fresh(view: ModelView, e: Entry, name: str, sizes: dict[str, int], seed: int, dtype) -> TensorRecipe:
    init = _init(e.spec)
    return TensorRecipe(name=name, shape=view.expected_shape(e.spec, e.info.shape, sizes),
                        dtype=output_dtype(dtype, e.info.dtype), init=init, seed=tensor_seed(seed, name),
                        note="new layer", offset=view.spec.value_offset(e.spec))


def _masks(view: ModelView, s: dict, t: dict, new_layers: list[int], ramp_steps: int) -> dict:
    """Per growth: the modules to hook, what is new, and when its alpha ramps."""
    present = {e.spec for e in view.entries}
    weights = [spec for spec in view.spec.tensors if spec in present and spec.pattern.endswith(".weight")]

    def modules(keep) -> list[str]:
        names = []
        for spec in weights:
            if keep(spec):
                layers = range(t["layers"]) if spec.per_layer else [None]
                names += [view.spec.module_path(spec.name(i).removesuffix(".weight")) for i in layers]
        return names

    def reads(space):
        return lambda spec: spec.reads is not None and spec.axes[spec.reads] == (space,)

    def normalises(space):
        return lambda spec: spec.role in NORM_ROLES and spec.axes[0] == (space,)

    growths = []
    if t["ffn"] != s["ffn"]:  # the input of the FFN's output projection: one entry per unit
        growths.append({"dimension": "ffn", "site": "input", "new": [s["ffn"], t["ffn"]], "modules": modules(reads("ffn"))})
    if t["heads"] != s["heads"]:  # the input of the attention output projection: head after head
        hd = s["head_dim"]
        growths.append({"dimension": "heads", "site": "input", "new": [s["heads"] * hd, t["heads"] * hd],
                        "modules": modules(reads("q"))})
        for space, count in (("q", "heads"), ("kv", "kv_heads")):  # q/k norms over the whole projection (OLMo-2)
            if t[count] != s[count] and modules(normalises(space)):
                growths.append({"dimension": "heads", "site": "norm", "new": [s[count] * hd, t[count] * hd],
                                "modules": modules(normalises(space))})
    if t["hidden"] != s["hidden"]:  # every norm over hidden entries: mask-aware statistics, masked output
        growths.append({"dimension": "hidden", "site": "norm", "new": [s["hidden"], t["hidden"]],
                        "modules": modules(normalises("hidden"))})
        if view.spec.branch_input == "residual":  # branches that read the residual itself see the new entries masked
            growths.append({"dimension": "hidden", "site": "input", "new": [s["hidden"], t["hidden"]],
                            "modules": modules(lambda spec: spec.per_layer and reads("hidden")(spec))})
    if new_layers:  # h <- alpha f(h) + (1 - alpha) h
        growths.append({"dimension": "layers", "site": "block", "layers": new_layers,
                        "modules": [view.spec.layer_module(i) for i in new_layers]})
    order = list(dict.fromkeys(g["dimension"] for g in growths))  # one ramp per dimension, in this order
    for growth in growths:
        growth["start_step"] = order.index(growth["dimension"]) * ramp_steps
        growth["ramp_steps"] = ramp_steps
    return {"format": "grow-msg-masks/1", "norm": view.spec.norm, "norm_offset": view.spec.norm_offset,
            "framework": view.spec.framework, "source_sizes": s, "target_sizes": t, "growths": growths}
