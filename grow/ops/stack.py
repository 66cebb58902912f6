"""G_stack: grow depth by stacking the whole model, target layer i a copy of source layer i mod L.

Embeddings, final norm and head stay as they are. Not function-preserving by design: grow verify
reports how far the stacked model is from the source."""

from __future__ import annotations

from ..arch.view import ModelView
from ..errors import UsageError
from ..plan import Plan
from .base import depth_config, mapped_recipe, target_config, whole_number
from .growth import stage_depths


def build(view: ModelView, *, layers=None, dtype: str | None = None) -> Plan:
    s = view.sizes
    if view.spec.stages:  # each stage stacks its own blocks
        t = stage_depths(view, "stack", layers)
    else:
        if layers is None:
            raise UsageError("--method stack needs --layers, the new depth (larger than the source's "
                             f"{s['layers']}).")
        layers = whole_number(layers, "--layers", s["layers"] + 1,
                              hint=f"; --method stack needs a depth larger than the source's {s['layers']}")
        t = dict(s, layers=layers)
    plans = {group: [i % s[group] for i in range(t[group])] for group in view.spec.layer_groups}
    recipes = [mapped_recipe(view, e, {}, dtype=dtype) for e in view.globals()
               if not (e.spec.role == "head" and view.tied)]  # a tied head is the embedding, stored once
    for group, layer_src in plans.items():
        for i, j in enumerate(layer_src):
            recipes += [mapped_recipe(view, e, {}, name=e.spec.name(i, e.expert), dtype=dtype,
                                      note=f"copy of layer {j}" if i != j else "") for e in view.layer(j, group)]
    before, after = sum(s[g] for g in plans), sum(t[g] for g in plans)
    return Plan(
        operation="expand", method="stack", exact=False, architecture=view.architecture,
        config=depth_config(view, target_config(view, t, dtype), plans.get("layers", [])), recipes=recipes,
        source_sizes=s, target_sizes=t, options={"layers": layers, "dtype": dtype},
        notes=[f"G_stack: layer i copies source layer i mod L{', stage by stage' if len(plans) > 1 else ''} "
               f"(L = {', '.join(str(s[g]) for g in plans)}; growth factor {after / before:.3g}); "
               "not function-preserving by design, grow verify reports the divergence."],
    )
