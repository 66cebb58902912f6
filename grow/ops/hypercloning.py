"""HyperCloning: widen by integer factors so that the wide model computes exactly what the source did.

The residual vector becomes n copies [x, ..., x]; heads and kv heads are multiplied by n (head_dim
stays, a single kv head stays single); every reader of a tiled space divides by its repeat. By default
the copies are split element-wise at random (pieces that sum exactly to the source weight, in the output
dtype), so that their gradients differ and they separate under training; --no-noise gives plain 1/n
copies, which receive identical gradients and stay identical forever."""

from __future__ import annotations

from ..arch.view import ModelView
from ..errors import UsageError
from ..plan import Plan
from .base import check_heads, mapped_recipe, target_config, whole_number
from .growth import SPLIT_SNR_DB, symmetry_breaking
from .maps import WidthMap, per_head, tile


def _factor(value, option: str) -> int:
    return whole_number(value, option, 2, hint="; HyperCloning grows by whole factors, for other sizes use --method lemon")


def build(view: ModelView, *, factor=None, ffn_factor=None, noise: bool = True, noise_snr_db: float | None = None,
          seed: int = 0, dtype: str | None = None) -> Plan:
    if not noise and noise_snr_db is not None:
        raise UsageError("--noise-snr-db sets the level of the noise that --no-noise turns off; give one of them.")
    snr = (SPLIT_SNR_DB if noise_snr_db is None else noise_snr_db) if noise else None
    n = _factor(factor, "--factor")
    m = n if ffn_factor is None else _factor(ffn_factor, "--ffn-factor")
    implied = [view.spec.sizes[sp].default for sp in view.spec.ffn_spaces if view.spec.sizes[sp].key is None]
    if m != n and implied:
        raise UsageError(f"--ffn-factor {m} differs from --factor {n}, but the FFN of a {view.architecture} checkpoint "
                         f"is always {implied[0]} (config.json has no FFN width); leave out --ffn-factor.")
    s = view.sizes
    t = dict(s)
    maps: dict[str, WidthMap] = {}
    # the residual (one per stage in staged models), the FFN (and every expert's), then the heads where there are any
    for spaces, k in ((view.spec.spaces_of("hidden"), n), (view.spec.ffn_spaces, m)):
        for space in spaces:
            t[space], maps[space] = s[space] * k, tile(s[space], k)
    if "heads" in s:
        t["heads"] = s["heads"] * n
        # a single kv head serves every query head as it is (MQA), unless each head has its own (GPT-2, ViT)
        single_kv = s["kv_heads"] == 1 and view.spec.sizes["kv_heads"].key is not None
        t["kv_heads"] = 1 if single_kv else s["kv_heads"] * n
        check_heads(view, t)
        maps["q"] = per_head(tile(s["heads"], n), s["head_dim"])
        if not single_kv:
            maps["kv"] = per_head(tile(s["kv_heads"], n), s["head_dim"])

    recipes = []
    for e in view.entries:
        role = e.spec.role
        if role == "head" and view.tied:
            continue  # the tie is kept; the 1/n it needs lives in the final norm
        scale = 1.0 / n if role == "final_norm" and view.tied else 1.0
        note = "1/n of the tied head folded in" if scale != 1.0 else ""
        recipes.append(mapped_recipe(view, e, maps, dtype=dtype, seed=seed, scale=scale,
                                     split_snr_db=snr, note=note))

    how, note = symmetry_breaking(snr)
    return Plan(
        operation="expand", method="hypercloning", exact=True, architecture=view.architecture,
        config=target_config(view, t, dtype), recipes=recipes, source_sizes=s, target_sizes=t,
        options={"factor": n, "ffn_factor": m, "noise": noise, "noise_snr_db": snr, "seed": seed, "dtype": dtype},
        notes=[note], stats={"symmetry_breaking": how},
    )
