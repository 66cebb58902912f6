"""MoE upcycling: turn each dense FFN into a mixture of experts that computes what it did.

Plain (granularity G = 1): every expert is a copy of the FFN. Fine-grained (G > 1): the FFN units
are split into G disjoint shards, expert e holds shard e mod G with its down projection times G,
and each group of G consecutive experts shares one router row, so a top-k that is a multiple of G
picks whole groups. With a shared expert the units are split into G + 1 slices: the shared expert
holds the first (gate weight 0, so sigmoid 1/2, and down projection times 2), the routed shards the
rest. When the router renormalises its top-k weights the layer output equals the dense FFN for any
router. The format facts (names, config keys, routing) live in the moe_format section of
arch/specs/{mixtral,qwen2_moe,qwen3_moe}.yaml."""

from __future__ import annotations

import math

import torch

from ..arch.moe import MoeFormat, moe_formats
from ..arch.view import Entry, ModelView
from ..checkpoint import DTYPE_LABELS, ITEMSIZE
from ..errors import UsageError
from ..plan import AxisMap, Init, Noise, Plan, TensorRecipe
from .base import mapped_recipe, output_dtype, target_config, tensor_seed, whole_number
from .maps import WidthMap, select

ROUTERS = ("random", "zero")


def choose_format(view: ModelView, name: str | None) -> MoeFormat:
    formats = moe_formats()
    arch = view.architecture
    if view.spec.upcycle_refusal:
        raise UsageError(f"grow upcycle cannot take a {arch} source: {view.spec.upcycle_refusal}.")
    if name is None:
        found = [f for f in formats.values() if arch in f.default_for]
        if not found:
            readable = sorted({a for f in formats.values() for a in f.sources})
            raise UsageError(f"grow upcycle takes a dense {', '.join(readable)} source; {arch} is not one of them.")
        return found[0]
    if name not in formats:
        raise UsageError(f"--format {name} is not one of {', '.join(formats)}.")
    fmt = formats[name]
    if arch not in fmt.sources:
        raise UsageError(f"--format {name} cannot hold a {arch} source; it takes {', '.join(fmt.sources)}.")
    return fmt


def parse_moe_layers(value, layers: int) -> list[int]:
    """`all`, `every-N` (layer i sparse when (i + 1) % N == 0, as decoder_sparse_step counts) or a list."""
    if value is None or value == "all":
        return list(range(layers))
    if isinstance(value, str) and value.startswith("every-"):
        step = value.removeprefix("every-")
        if not step.isdigit() or int(step) < 1:
            raise UsageError(f"--moe-layers {value} needs a whole step of at least 1, like every-2.")
        chosen = [i for i in range(layers) if (i + 1) % int(step) == 0]
    else:
        items = value.split(",") if isinstance(value, str) else list(value)
        try:
            chosen = sorted({int(str(x).strip()) for x in items})
        except ValueError:
            raise UsageError(f"--moe-layers {value} is not all, every-N or a comma-separated list of layer indices.") from None
        bad = [i for i in chosen if not 0 <= i < layers]
        if bad:
            raise UsageError(f"--moe-layers names layer {bad[0]}, but the source has layers 0 to {layers - 1}.")
    if not chosen:
        raise UsageError(f"--moe-layers {value} leaves no layer of the {layers} sparse; name at least one.")
    return chosen


def _check_source(view: ModelView, fmt: MoeFormat) -> None:
    for rule in fmt.refuse:
        if view.architecture == rule["architecture"] and view.config.get(rule["key"]) is not None:
            raise UsageError(f"--format {fmt.name} cannot hold this source: {rule['why']}.")
    for e in view.entries:
        for pattern in fmt.forbidden:
            if e.spec.pattern == pattern:
                raise UsageError(f"--format {fmt.name} has no place for tensor {e.name}; "
                                 f"the source has a bias that {fmt.architecture} cannot hold.")


def _dense_layer_config(fmt: MoeFormat, value, sparse: list[int], layers: int) -> dict:
    if len(sparse) == layers:
        return {fmt.dense_layers["list"]: [], fmt.dense_layers["step"]: 1} if fmt.dense_layers else {}
    if fmt.dense_layers is None:
        raise UsageError(f"--moe-layers {value} leaves layers dense, which --format {fmt.name} cannot hold "
                         "(every layer of it is sparse); use all, or a format with dense layers such as qwen2_moe.")
    step = int(value.removeprefix("every-")) if isinstance(value, str) and value.startswith("every-") else 1
    dense = [] if step > 1 else [i for i in range(layers) if i not in sparse]
    return {fmt.dense_layers["list"]: dense, fmt.dense_layers["step"]: step}


def _check_expert_width(fmt: MoeFormat, view: ModelView, f: int, width: int, E: int, k: int, G: int,
                        shared_expert: bool, dtype: str | None) -> None:
    """An expert width the framework's kernels cannot run in the output dtype (the output would load and
    then fail on its first forward pass) is refused with the granularities and dtype that work."""
    out = output_dtype(dtype, view.source.dtype)
    if width * ITEMSIZE[out] % fmt.expert_row_bytes == 0:
        return
    extra = 1 if shared_expert else 0
    fits = [g for g in range(1, E + 1) if E % g == 0 and k % g == 0 and f % (g + extra) == 0
            and f // (g + extra) * ITEMSIZE[out] % fmt.expert_row_bytes == 0]
    options = [f"--granularity {g} (width {f // (g + extra)})" for g in fits]
    if width * ITEMSIZE["F32"] % fmt.expert_row_bytes == 0:
        options.append("--dtype float32")
    raise UsageError(
        f"experts of {width} FFN units ({f} / {G + extra}) are {width * ITEMSIZE[out]} bytes per row in "
        f"{DTYPE_LABELS[out]}, not a multiple of the {fmt.expert_row_bytes} bytes transformers' {fmt.name} expert "
        f"kernels need, so the output could not run; use {' or '.join(options) or 'another --granularity'}.")


def build(view: ModelView, *, experts=None, top_k=None, granularity=1, shared_expert: bool = False,
          format: str | None = None, router: str = "random", router_std: float = 0.02,
          expert_noise: float | None = None, moe_layers="all", renormalize: bool = True, seed: int = 0,
          dtype: str | None = None) -> Plan:
    fmt = choose_format(view, format)
    if experts is None or top_k is None:
        raise UsageError("upcycle needs --experts and --top-k.")
    E = whole_number(experts, "--experts", 2)
    k = whole_number(top_k, "--top-k", 1)
    G = whole_number(granularity, "--granularity", 1)
    if k > E:
        raise UsageError(f"--top-k {k} exceeds --experts {E}; a token cannot use more experts than there are.")
    if E % G:
        raise UsageError(f"--experts {E} is not a multiple of --granularity {G}; experts come in groups of G.")
    if k % G:
        raise UsageError(f"--top-k {k} is not a multiple of --granularity {G}; the router picks whole groups of G experts.")
    if shared_expert and fmt.shared is None:
        raise UsageError(f"--shared-expert needs a format with a shared expert (qwen2_moe); {fmt.name} has none.")
    if router not in ROUTERS:
        raise UsageError(f"--router {router} is not one of {', '.join(ROUTERS)}.")
    if not router_std > 0:
        raise UsageError(f"--router-std must be positive, not {router_std}.")
    if expert_noise is not None and not expert_noise >= 0:
        raise UsageError(f"--expert-noise must be zero or positive, not {expert_noise}.")
    if not renormalize and fmt.renormalize == "always":
        raise UsageError(f"--no-renormalize does not apply to --format {fmt.name}, whose router always renormalises.")
    renorm = bool(renormalize)
    _check_source(view, fmt)

    s = view.sizes
    f, hidden, L = s["ffn"], s["hidden"], s["layers"]
    slices = G + (1 if shared_expert else 0)
    if f % slices:
        what = f"--granularity {G} plus the shared expert's slice" if shared_expert else f"--granularity {G}"
        raise UsageError(f"the FFN width {f} is not divisible by {slices} ({what}); FFN units are split into equal slices.")
    width = f // slices
    _check_expert_width(fmt, view, f, width, E, k, G, shared_expert, dtype)
    sparse = parse_moe_layers(moe_layers, L)
    dense_cfg = _dense_layer_config(fmt, moe_layers, sparse, L)
    noisy = bool(expert_noise)
    tie_broken = router == "zero" and G > 1

    by_pattern: dict[tuple[str, int | None], Entry] = {(e.spec.pattern, e.layer): e for e in view.entries}
    dense_parts = {pattern: part for part, pattern in fmt.dense.items()}

    def shard(index: int) -> WidthMap | None:
        if width == f:
            return None  # a plain copy needs no gather
        start = index * width
        return select(f, torch.arange(start, start + width), label=f"FFN units {start}..{start + width - 1}")

    def part_recipe(entry: Entry, name: str, part: str, units: WidthMap | None, down_scale: float, note: str,
                    noise: bool) -> TensorRecipe:
        r = mapped_recipe(view, entry, {"ffn": units} if units else {}, name=name, dtype=dtype, seed=seed, fan_in=False,
                          scale=down_scale if part == "down" else 1.0, note=note)
        if noise:
            # one group over the fan-in axis: independent noise per row at the asked relative size
            reads = entry.spec.reads
            r.noise = Noise(reads, torch.zeros(r.shape[reads], dtype=torch.long), -20 * math.log10(expert_noise))
        return r

    recipes: list[TensorRecipe] = []
    for e in view.entries:
        role = e.spec.role
        if role == "head" and view.tied:
            continue
        part = dense_parts.get(e.spec.pattern)
        if part is None or e.layer not in sparse:
            recipes.append(mapped_recipe(view, e, {}, dtype=dtype, seed=seed))
            for req in fmt.required:
                if req["like"] == e.spec.pattern and (req["name"], e.layer) not in by_pattern:
                    name = req["name"].replace("{i}", str(e.layer))
                    recipes.append(TensorRecipe(name, (e.info.shape[req["axis"]],), output_dtype(dtype, e.info.dtype),
                                                seed=tensor_seed(seed, name), note="zero bias the format requires"))
            continue
        i = str(e.layer)
        wdtype = output_dtype(dtype, e.info.dtype)
        if part == "gate":
            name = fmt.router.replace("{i}", i)
            group_rows = AxisMap(torch.arange(E) // G, None, f"groups of {G} share a row" if G > 1 else "")
            init = Init("normal", router_std) if router == "random" else Init("zeros")
            recipes.append(TensorRecipe(name, (E, hidden), wdtype, base_shape=(E // G, hidden), axes=(group_rows, None),
                                        init=init, seed=tensor_seed(seed, name), note="router"))
            if fmt.shared is not None:
                name = fmt.shared["router"].replace("{i}", i)
                recipes.append(TensorRecipe(name, (1, hidden), wdtype, seed=tensor_seed(seed, name),
                                            note="shared-expert gate 0: sigmoid 1/2"))
        if fmt.shared is not None:
            name = fmt.shared[part].replace("{i}", i)
            if shared_expert:
                recipes.append(part_recipe(e, name, part, shard(0), 2.0, "shared expert", False))
            else:  # the format always has a shared expert; grow gives it no units
                shape = (0, hidden) if part != "down" else (hidden, 0)
                recipes.append(TensorRecipe(name, shape, wdtype, seed=tensor_seed(seed, name), note="empty shared expert"))
        for x in range(E):
            name = fmt.expert[part].replace("{i}", i).replace("{e}", str(x))
            units = shard(x % G + (1 if shared_expert else 0))
            recipes.append(part_recipe(e, name, part, units, float(G), f"expert {x}", noisy))

    cfg = target_config(view, s, dtype)
    cfg["architectures"] = [fmt.architecture]
    cfg["model_type"] = fmt.model_type
    cfg[fmt.keys["experts"]] = E
    cfg[fmt.keys["top_k"]] = k
    cfg[fmt.keys["expert_ffn"]] = width
    if "shared_ffn" in fmt.keys:
        cfg[fmt.keys["shared_ffn"]] = width if shared_expert else 0
    if fmt.renormalize_key:
        cfg[fmt.renormalize_key] = renorm
    cfg.update(dense_cfg)
    cfg.update(fmt.set)

    expert_params = 3 * hidden * width
    total = sum(math.prod(r.shape) for r in recipes)
    active = total - len(sparse) * (E - k) * expert_params
    notes = [f"{len(sparse)} of {L} layers sparse ({', '.join(map(str, sparse))}); {E} experts of {width} FFN units, "
             f"top-{k}" + (f", in groups of {G} sharing a router row" if G > 1 else "")
             + (f", plus a shared expert of {width} units" if shared_expert else "") + "."]
    if not renorm:
        notes.append("not exact: the router does not renormalise its top-k weights, so the experts' outputs are "
                     "scaled by the router's probabilities.")
    if noisy:
        notes.append(f"not exact: every routed expert carries independent noise of {expert_noise:g} times its weights' RMS.")
    if tie_broken:
        notes.append("not exact: a zero router ties every group, and which shards top-k then picks depends on how it "
                     "breaks ties; use --router random for an exact fine-grained model.")
    return Plan(
        operation="upcycle", method="moe", exact=renorm and not noisy and not tie_broken,
        architecture=fmt.architecture, config=cfg, recipes=recipes, source_sizes=s, target_sizes=dict(s),
        options={"experts": E, "top_k": k, "granularity": G, "shared_expert": shared_expert, "format": fmt.name,
                 "router": router, "router_std": router_std, "expert_noise": expert_noise,
                 "moe_layers": moe_layers if isinstance(moe_layers, str) else list(moe_layers),
                 "renormalize": renorm, "seed": seed, "dtype": dtype},
        notes=notes,
        stats={"format": fmt.name, "experts": E, "top_k": k, "granularity": G, "expert_ffn": width,
               "shared_expert_ffn": width if shared_expert else 0, "moe_layers": sparse,
               "active_parameters_per_token": active},
    )
