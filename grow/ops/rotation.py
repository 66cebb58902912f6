"""Rotating the residual stream onto its principal directions before cutting it (SliceGPT's
computational invariance), so that a narrower residual keeps most of what the layers read.

An RMSNorm computes w * x / rms(x). With its weight w folded into the Linears that read its output,
it computes x / rms(x), which an orthogonal rotation Q of the residual leaves unchanged. So the model
whose embedding rows and residual writers' outputs are multiplied by Q^T, and whose readers' inputs by
Q (after folding w), computes exactly what the source did; its norm weights are 1. With Q the
eigenvectors of the residual's second moment (as the norms see it: each vector scaled to unit mean
square), the first k directions carry the most of it, and cutting the residual to them loses the least.
One global Q for every layer keeps the output a standard checkpoint of the same architecture.

After the cut a norm measures the rms over k directions that hold a fraction f of the energy, so its
output is sqrt(k / (D f)) of what the readers saw: the norm weights become sqrt(D f / k) instead of 1.

A tied head cannot absorb the final norm's weight while the embedding stays unscaled, so a tied model
is untied: the head is the rotated embedding with the final norm's weight folded in. That keeps the
result exact before the cut, at the cost of a second vocab x k matrix."""

from __future__ import annotations

import torch

from ..arch.spec import NORM_ROLES
from ..arch.view import ModelView
from ..plan import AxisMap, Init, Plan, TensorRecipe
from .base import output_dtype, tensor_seed

HIDDEN = ("hidden",)


def unsupported(view: ModelView) -> str | None:
    """Why the residual of this family cannot be rotated and stay a standard checkpoint; None if it can."""
    spec = view.spec
    if spec.norm != "rms":
        return (f"a {spec.family} model's LayerNorm subtracts the mean of the residual, which a rotation does not "
                "keep, and its final bias cannot fold into the head")
    if spec.block != "pre_norm" or spec.by_role("post_norm"):
        return f"a {spec.family} model's norms do not all sit before the Linears that read the residual"
    if spec.norm_offset or spec.embedding_scale:
        return (f"a {spec.family} model's (1 + w) norms and sqrt(hidden)-scaled embedding are not folded into a "
                "rotation yet")
    for t in spec.tensors:
        fused = any(len(ax) > 1 and "hidden" in ax for ax in t.axes)
        if fused or (t.reads is not None and t.axes[t.reads] == HIDDEN and t.norm is None):
            return f"{spec.file.name} does not say which norm feeds {t.pattern}"
    return None


def principal_basis(covariance: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """The k leading eigenvectors [d, k] of the covariance, and the fraction of its trace they hold."""
    values, vectors = torch.linalg.eigh(covariance.to(torch.float64))
    order = torch.argsort(values, descending=True)[:k]
    kept = float(values[order].sum() / values.sum())
    return vectors[:, order].to(torch.float32).contiguous(), kept


def rotate(view: ModelView, plan: Plan, covariance: torch.Tensor, k: int) -> None:
    """Rewrite every residual axis of the plan's recipes (built with the residual left whole) as the
    product with the k leading principal directions; norm weights folded into their readers."""
    d = view.sizes["hidden"]
    q, kept = principal_basis(covariance, k)
    norm_weight = (d * kept / k) ** 0.5
    label = f"rotated onto {k} of {d} principal directions"
    recipes = []
    for r in plan.recipes:
        entry = view.by_name[r.sources[0]]
        spec = entry.spec
        if spec.role in NORM_ROLES and spec.axes == (HIDDEN,):
            if r.name.endswith(".weight"):
                recipes.append(TensorRecipe(r.name, (k,), r.dtype, init=Init("ones"), scale=norm_weight,
                                            note=f"weight folded into its readers; {label}"))
            continue
        axes, shape = list(r.axes), list(r.shape)
        for axis, spaces in enumerate(spec.axes):
            if spaces == HIDDEN:
                assert axes[axis] is None, f"{r.name}: the residual axis was already mapped"
                prescale = spec.norm_name(entry.layer) if axis == spec.reads else None
                axes[axis] = AxisMap(matrix=q, prescale=prescale, label=label + (f", {prescale} folded in" if prescale else ""))
                shape[axis] = k
        r.axes, r.shape = tuple(axes), tuple(shape)
        recipes.append(r)
    if view.tied:
        embedding = next(e for e in view.entries if e.spec.role == "embedding")
        head = view.spec.by_role("head")[0]
        name = head.name()
        recipes.append(TensorRecipe(
            name, (view.sizes["vocab"], k), output_dtype(plan.options.get("dtype"), embedding.info.dtype),
            sources=(embedding.name,), axes=(None, AxisMap(matrix=q, prescale=head.norm_name(), label=label)),
            seed=tensor_seed(plan.options.get("seed", 0), name),
            note=f"untied: the embedding with {head.norm_name()} folded in"))
        plan.config[view.spec.tie_key] = False
        plan.notes.append(f"the tied head was untied ({name} written): the final norm's weight folds into the head "
                          "but not into the embedding, and untied the rotation stays exact before the cut")
    plan.recipes = recipes
    plan.notes.append(f"residual {label}, which hold {kept:.1%} of its second moment; norm weights "
                      f"{norm_weight:.4g} (= sqrt({d} x {kept:.3f} / {k}))")
    plan.stats["residual_kept"] = kept
