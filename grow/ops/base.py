"""What every plan builder shares: turning space maps into recipes, and the target config."""

from __future__ import annotations

import zlib

import torch

from ..arch.moe import remap_dense_layers
from ..arch.spec import TensorSpec, get_path, set_path
from ..arch.view import Entry, ModelView
from ..checkpoint import DTYPES
from ..errors import UsageError
from ..plan import AxisMap, Init, Split, TensorRecipe
from .maps import WidthMap, concat, identity, interleave

DTYPE_CHOICES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


SIZE_OPTIONS = {"hidden": "--hidden", "ffn": "--ffn", "heads": "--heads", "kv_heads": "--kv-heads", "layers": "--layers"}


def whole_number(value, option: str, least: int = 1, hint: str = "", most: int | None = None) -> int:
    """An option that must be a whole number (2 and 2.0 both are), as an int; anything else is one sentence."""
    if value is None:
        example = least if most is None else most
        raise UsageError(f"{option} is required: give a whole number of at least {least}, e.g. {option} {example}{hint}.")
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer()
            or value < least or (most is not None and value > most)):
        bounds = f"of at least {least}" if most is None else f"from {least} to {most}"
        raise UsageError(f"{option} must be a whole number {bounds}, not {value!r}{hint}.")
    return int(value)


def check_size_rules(view: ModelView, t: dict[str, int], grow: bool) -> None:
    """Rules the framework itself enforces on a config (spec size_checks), with a size that would work."""
    failed = view.spec.failed_checks(view.architecture, t)
    if failed:
        sizes = ", ".join(f"{k}={t[k]}" for k in SIZE_OPTIONS)
        fit = (-(-t["hidden"] // t["heads"]) if grow else t["hidden"] // t["heads"]) * t["heads"]
        raise UsageError(f"{view.architecture} requires {' and '.join(failed)}, which {sizes} break; "
                         f"e.g. --hidden {fit} fits --heads {t['heads']}.")


def output_dtype(dtype: str | None, entry_dtype: str) -> str:
    if dtype is None:
        return entry_dtype
    if dtype not in DTYPE_CHOICES:
        raise UsageError(f"--dtype {dtype} is not one of {', '.join(DTYPE_CHOICES)}.")
    return DTYPE_CHOICES[dtype]


def tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def space_maps(view: ModelView, maps: dict[str, WidthMap], spaces: tuple[str, ...],
               interleaved: bool = False) -> WidthMap | None:
    """The map for one axis (fused axes combine their parts); None when nothing changes."""
    if not any(s in maps for s in spaces):
        return None
    parts, sizes = [], []
    for s in spaces:
        n = view.spec.space_size(s, view.sizes)
        parts.append(maps.get(s) or identity(n))
        sizes.append(n)
    if len(parts) == 1:
        return parts[0]
    return interleave(parts, view.sizes["head_dim"]) if interleaved else concat(parts, sizes)


def scale_facts(view: ModelView, entry: Entry, maps: dict[str, WidthMap]) -> tuple[float, str]:
    """A factor every operator needs on this tensor because of the model's own constants, and why: an
    embedding that the model scales by a size-dependent factor (Gemma: sqrt(hidden)) is rescaled so that
    what reaches the residual is what the operator meant; a tied head, which is that embedding, gets the
    inverse folded into the final norm that feeds it."""
    if "hidden" not in maps or view.spec.embedding_scale is None:
        return 1.0, ""
    r = view.spec.embedding_rescale(view.sizes, dict(view.sizes, hidden=maps["hidden"].size))
    if entry.spec.role == "embedding":
        return r, f"x {r:.6g}: the model scales embeddings by {view.spec.embedding_scale}"
    if entry.spec.role == "final_norm" and view.tied:
        return 1 / r, "embedding rescale of the tied head folded in"
    return 1.0, ""


def mapped_recipe(view: ModelView, entry: Entry, maps: dict[str, WidthMap], *, name: str | None = None,
                  dtype: str | None = None, seed: int = 0, scale: float = 1.0, split_snr_db: float | None = None,
                  init: Init = Init(), fan_in: bool = True, note: str = "") -> TensorRecipe:
    """Recipe that gathers every axis of `entry` through the map of its space; the fan-in axis
    (if any) is also scaled by the map's fan-in weights, or, with split_snr_db, its copies become
    random element-wise pieces of the source weight (Split) instead."""
    spec: TensorSpec = entry.spec
    axes, shape = [], []
    split = None
    factor, why = scale_facts(view, entry, maps)
    if factor != 1.0:
        scale *= factor
        note = "; ".join(filter(None, [note, why]))
    for k, spaces in enumerate(spec.axes):
        m = space_maps(view, maps, spaces, spec.interleaved)
        if m is None:
            axes.append(None)
            shape.append(entry.info.shape[k])
            continue
        reads = fan_in and k == spec.reads
        groups = m.copy_groups() if reads and split_snr_db is not None else None
        if groups is not None and bool((groups >= 0).any()):
            split = Split(k, groups, split_snr_db)  # the pieces replace the fan-in weights
            axes.append(AxisMap(m.src, None, m.label))
        else:
            weighted = reads and not torch.all(m.fan_in == 1)
            axes.append(AxisMap(m.src, m.fan_in if weighted else None, m.label + (" (fan-in weighted)" if weighted else "")))
        shape.append(m.size)
    out = name or entry.name
    return TensorRecipe(
        name=out, shape=tuple(shape), dtype=output_dtype(dtype, entry.info.dtype), sources=(entry.name,),
        axes=tuple(axes), scale=scale, init=init, split=split, seed=tensor_seed(seed, out), note=note,
        offset=view.spec.value_offset(spec),
    )


def target_config(view: ModelView, target_sizes: dict[str, int], dtype: str | None) -> dict:
    """The source config with every changed size recomputed, written with keys transformers 4 and 5 both read."""
    cfg = view.spec.write_sizes(view.config, view.sizes, target_sizes)
    if view.spec.framework != "transformers":
        return cfg
    if view.spec.tie_key:
        cfg[view.spec.tie_key] = view.tied
    if dtype is not None:
        cfg["torch_dtype"] = cfg["dtype"] = dtype
    else:
        current = cfg.get("torch_dtype") or cfg.get("dtype") or str(DTYPES[view.source.dtype]).removeprefix("torch.")
        cfg["torch_dtype"] = cfg["dtype"] = current
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
    return cfg


def depth_config(view: ModelView, config: dict, layer_src: list[int]) -> dict:
    """Rebuild the config entries that hold one value per layer, and the ones that count layers, for a
    model whose layer i derives from source layer layer_src[i]."""
    spec = view.spec
    moe = spec.model.moe_format
    if moe is not None and moe.dense_layers is not None:
        remap_dense_layers(config, moe.dense_layers, view.sizes["layers"], layer_src)
    for key in spec.per_layer_keys:
        values = spec.per_layer_values(key, config, view.sizes["layers"])
        if values is not None:
            set_path(config, key, [values[j] for j in layer_src])
    for key in spec.layer_count_keys:
        count = get_path(config, key)
        if isinstance(count, int) and not isinstance(count, bool):
            layers = view.sizes["layers"]
            # a count covering every source layer keeps covering every layer; otherwise count the layers below it
            set_path(config, key, max(count, len(layer_src)) if count >= layers else sum(j < count for j in layer_src))
    return config


def check_heads(view: ModelView, sizes: dict[str, int]) -> None:
    """Query heads must divide evenly among kv heads (query head j reads kv head j // group)."""
    if sizes["kv_heads"] < 1 or sizes["heads"] % sizes["kv_heads"]:
        raise UsageError(
            f"{sizes['heads']} query heads cannot be shared among {sizes['kv_heads']} kv heads; "
            "the number of heads must be a multiple of the number of kv heads."
        )

