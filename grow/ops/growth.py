"""What the growth operators share: target sizes from the options, head maps that keep the kv groups,
unequal fan-in splits, depth maps, and the per-layer config entries of a new depth."""

from __future__ import annotations

import torch

from ..arch.view import ModelView
from ..errors import UsageError
from .base import SIZE_OPTIONS as OPTIONS
from .base import check_size_rules, whole_number

# Default level of the element-wise random split of copies (dB of each piece's share over its noise),
# chosen by scripts/growth_evidence.py (README "Does growing pay off?").
SPLIT_SNR_DB = 10.0


def symmetry_breaking(snr_db: float | None, column_split: bool = False) -> tuple[str, str]:
    """What breaks the symmetry of copied units, as (short name for stats, note for --dry-run and grow.json)."""
    if column_split:
        return ("unequal column split", "copies are unequal scalar multiples of the source column: they differ, "
                "but their gradients start parallel.")
    if snr_db is None:
        return ("none", "copies are equal (no noise): they receive identical gradients and stay identical under "
                "training; leave out --no-noise to break the symmetry.")
    return (f"element-wise split at {snr_db:g} dB",
            f"copies are random element-wise pieces of the source weights ({snr_db:g} dB SNR per element) that sum "
            "to it exactly in the output dtype: they separate under training while the forward pass stays exact.")


def target_sizes(view: ModelView, method: str, **given) -> dict[str, int]:
    """The source sizes with the given ones grown; heads keep the query heads per kv head, and where the
    architecture has hidden = heads x head_dim, the one left out follows the other."""
    s = view.sizes
    given = {k: whole_number(v, OPTIONS[k]) for k, v in given.items() if v is not None}
    for k, v in given.items():
        if v < s[k]:
            raise UsageError(f"{OPTIONS[k]} {v} is smaller than the source's {s[k]}; --method {method} only grows "
                             "(use grow shrink to make a model smaller).")
    if all(given.get(k, s[k]) == s[k] for k in OPTIONS):
        raise UsageError(f"--method {method} needs at least one size larger than the source's: " + ", ".join(
            f"{OPTIONS[k]} (now {s[k]})" for k in OPTIONS) + ".")
    t = dict(s)
    t.update(given)
    group = s["heads"] // s["kv_heads"]
    head_dim = s["head_dim"]
    tied_hidden = view.spec.sizes["head_dim"].key is None  # hidden is always heads x head_dim
    if tied_hidden and "hidden" in given and "heads" not in given and "kv_heads" not in given:
        step = head_dim * group
        if given["hidden"] % step:
            lo, hi = given["hidden"] // step * step, -(-given["hidden"] // step) * step
            what = f"head_dim ({head_dim})" if group == 1 else f"head_dim x query heads per kv head ({step})"
            fits = f"--hidden {lo} or {hi}" if lo > s["hidden"] else f"--hidden {hi}"
            raise UsageError(f"--hidden {given['hidden']} is not a multiple of {what}: a {view.spec.family} model has "
                             f"hidden = heads x head_dim; use e.g. {fits}.")
        given["heads"] = t["heads"] = given["hidden"] // head_dim
    if "heads" in given and "kv_heads" not in given:
        if given["heads"] % group:
            raise UsageError(
                f"--heads {given['heads']} cannot keep the source's {group} query heads per kv head; "
                f"use a multiple of {group}, e.g. --heads {-(-given['heads'] // group) * group}.")
        t["kv_heads"] = given["heads"] // group
    elif "kv_heads" in given and "heads" not in given:
        t["heads"] = given["kv_heads"] * group
    elif t["heads"] != t["kv_heads"] * group:
        raise UsageError(
            f"--heads {t['heads']} with --kv-heads {t['kv_heads']} changes the query heads per kv head from {group}; "
            f"keep {group}, e.g. --heads {t['kv_heads'] * group} --kv-heads {t['kv_heads']}.")
    if tied_hidden:
        if "hidden" not in given:
            t["hidden"] = t["heads"] * head_dim
        elif t["hidden"] != t["heads"] * head_dim:
            raise UsageError(
                f"--hidden {t['hidden']} with --heads {t['heads']} does not fit a {view.spec.family} model, where "
                f"hidden = heads x head_dim ({head_dim}); use e.g. --hidden {t['heads'] * head_dim} "
                f"--heads {t['heads']}.")
    check_size_rules(view, t, grow=True)
    return t


def stage_depths(view: ModelView, method: str, layers, **widths) -> dict[str, int]:
    """Target sizes of a model built of stages (ConvNeXt), whose depth grows: `layers` is one depth per
    stage, or the new total depth, spread over the stages in proportion to their depths (largest
    remainders first). Widths are refused: each stage has its own, which HyperCloning grows."""
    given = [k for k, v in widths.items() if v is not None]
    if given:
        raise UsageError(f"--method {method} grows the depth of a {view.architecture} checkpoint, not its "
                         f"{OPTIONS[given[0]]}: each stage has its own width; widen it with --method hypercloning.")
    s, groups = view.sizes, view.spec.layer_groups
    source = [s[g] for g in groups]
    if layers is None:
        raise UsageError(f"--method {method} needs --layers, the new total depth (now {sum(source)}: {source} "
                         "stage by stage), or one depth per stage.")
    if isinstance(layers, (list, tuple)):
        if len(layers) != len(groups):
            raise UsageError(f"--layers needs one depth for each of the {len(groups)} stages, not {list(layers)}.")
        new = [whole_number(v, "--layers", n, hint=f"; stage {k} has {n} already and {method} only grows")
               for k, (v, n) in enumerate(zip(layers, source))]
    else:
        total = whole_number(layers, "--layers", sum(source) + 1,
                             hint=f"; --method {method} needs a depth larger than the source's {sum(source)}")
        new = proportional(source, total)
    if new == source:
        raise UsageError(f"--method {method} needs a depth larger than the source's {source}.")
    return dict(s, **dict(zip(groups, new)))


def proportional(counts: list[int], total: int, least: int = 0) -> list[int]:
    """`total` shared out in proportion to `counts`, each share at least `least`, largest remainders first."""
    quotas = [total * n / sum(counts) for n in counts]
    new = [max(least, int(q)) for q in quotas]
    for k in sorted(range(len(new)), key=lambda k: new[k] - quotas[k])[: max(0, total - sum(new))]:
        new[k] += 1
    while sum(new) > total:  # the floor of `least` took more than the total: give back where most is over
        new[max((k for k in range(len(new)) if new[k] > least), key=lambda k: new[k] - quotas[k])] -= 1
    return new


def grouped_heads(heads: int, kv_heads: int, new_kv_heads: int,
                  whole_copies: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Circular copies of kv heads, and of query heads group by group, so that target query head j
    (which reads kv head j // group) copies a query head of the kv head that its kv head copies.
    whole_copies: only whole copies of all kv heads; the remaining kv heads and their query heads are new (-1)."""
    group = heads // kv_heads
    kv_src = torch.arange(new_kv_heads) % kv_heads
    if whole_copies:
        kv_src[new_kv_heads // kv_heads * kv_heads:] = -1
    head_src = kv_src.repeat_interleave(group) * group + torch.arange(group).repeat(new_kv_heads)
    head_src[kv_src.repeat_interleave(group) < 0] = -1
    return head_src, kv_src


def appended(n: int, new_n: int) -> torch.Tensor:
    """Source positions kept in place, new positions (-1) after them."""
    return torch.cat([torch.arange(n), torch.full((new_n - n,), -1)])


def unequal_split(src: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fan-in weights for copies: the copies of one source position get unequal positive weights that
    sum to 1, so that copies differ from the start; new positions (-1) get 1."""
    u = 0.5 + torch.rand(src.shape, generator=gen, dtype=torch.float64)
    copied = src >= 0
    totals = torch.zeros(int(src.max()) + 1, dtype=torch.float64).index_add_(0, src[copied], u[copied])
    counts = torch.bincount(src[copied], minlength=totals.numel())
    w = torch.ones_like(u)
    w[copied] = torch.where(counts[src[copied]] > 1, u[copied] / totals[src[copied]], torch.ones(()).double())
    return w.float()


def spread_layers(layers: int, new_layers: int) -> list[tuple[int, bool]]:
    """Target layers as (source layer, is new): new layers spread evenly among the source layers, each
    placed after (and derived from) the source layer before it."""
    extra = new_layers - layers
    out = []
    for i in range(layers):
        out.append((i, False))
        out += [(i, True)] * ((i + 1) * extra // layers - i * extra // layers)
    return out
