"""The spec file format (grow/arch/specs/*.yaml), validated: every key, role and space a spec may use.

A spec that uses a key this schema does not define, a role or space nobody defines, or a size that no
entry under `sizes` provides is refused with the file and the key named. To add a key: add a field to
the model of its section below (with a default if older specs lack it), then read it in ArchSpec."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import GrowError

# What each tensor role means to the operators.
ROLES = {
    "weight": "an ordinary Linear weight or bias (the default)",
    "embedding": "token embedding: writes the residual stream",
    "position": "learned positions: write the residual stream",
    "patch": "patch embedding (vision): writes the residual stream",
    "token": "a learned token such as a class token: writes the residual stream",
    "norm": "elementwise weight or bias of a norm inside a block",
    "final_norm": "elementwise weight or bias of the norm before the head",
    "qk_norm": "elementwise weight of a query or key norm (per head, or over the whole projection)",
    "post_norm": "elementwise weight of a norm on a branch's output before it is added to the residual",
    "head": "output head (possibly tied to the embedding)",
    "router": "mixture-of-experts router rows (or a shared expert's gate): read the residual",
    "layer_scale": "per-channel scale of a branch's output before the residual add (timm's ls1.gamma)",
    "depthwise": "a depthwise convolution inside a block: each channel reads only itself (no fan-in, no residual write)",
}
# Spaces every spec has; "fixed" marks axes no operator changes, q and kv are heads x head_dim.
FIXED_SPACE = "fixed"
DERIVED_SPACES = {"q": ("heads", "head_dim"), "kv": ("kv_heads", "head_dim")}
REQUIRED_SIZES = ("hidden", "layers", "heads", "kv_heads", "head_dim")
STAGED_SIZES = ("hidden{s}", "layers{s}")  # what a spec with stages defines instead (a ConvNeXt has no heads)
STAGE, PREVIOUS_STAGE = "{s}", "{s-1}"
OPERATIONS = ("expand", "shrink", "upcycle")
PLACEHOLDER = re.compile(r"\{[^}]*\}")


class SpecError(GrowError):
    """A spec file that does not follow the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tie(_Strict):
    key: str  # boolean config key that says whether the head is the embedding
    default: bool  # its value when the config leaves it out


class Size(_Strict):
    key: Optional[str] = None  # dotted path into config.json; none: the size is implied by `default`
    default: Union[str, int, None] = None  # expression over other sizes, used when the key is absent or null
    ratio_of: Optional[str] = None  # the config stores size / sizes[ratio_of]
    mirror: list[str] = []  # other config paths that hold the same value
    aliases: list[str] = []  # config paths read when `key` is absent (names that changed over versions)
    ffn: bool = False  # an FFN width besides `ffn` itself (an expert's): operators change it as they change the FFN
    # attribute path of the model the framework builds from the config (arch/built.py), read when `key` is
    # absent: the architecture's registered default, which timm leaves out of config.json
    built: Optional[str] = None
    last_mirror: list[str] = []  # a size written with {s}: config paths that hold the last stage's value


class Tensor(_Strict):
    name: str  # "{i}" stands for the layer index, "{e}" for an expert index
    axes: list[str]  # per axis, a space, or spaces concatenated along it joined by "|"
    reads: Optional[int] = None  # the fan-in axis: the one contracted with the input
    role: Literal[tuple(ROLES)] = "weight"
    interleaved: bool = False  # a fused axis stored head by head ([head 0: q, k, v], [head 1: ...])
    normalises: Optional[str] = None  # a q/k norm over the whole projection: the module whose output it normalises
    norm: Optional[str] = None  # a reader of the residual: the weight of the norm whose output it reads
    closes_block: bool = False  # a post-LN block's last norm: its output is the block's output


class ModelEntry(_Strict):
    """How transformers loads one architecture, and what grow verify compares."""

    auto_class: str = "AutoModelForCausalLM"
    output: str = "logits"  # the attribute of the model's output that verify compares
    output_axis: Optional[str] = None  # the space of the output's last axis when it is a width (a bare encoder's hidden)
    objective: Optional[Literal["causal_lm", "masked_lm"]] = "causal_lm"  # the head's loss; none for a bare encoder
    base_model: bool = False  # the architecture is the base model: its module paths lack the optional prefix too
    # the module mapping the last hidden state to the output, when it is more than the final norm and the output
    # embeddings (a masked-LM head's own transform): verify's logit lens reads every layer boundary through it
    head: Optional[str] = None


class MoeKeys(_Strict):
    experts: str
    top_k: str
    expert_ffn: str
    shared_ffn: Optional[str] = None


class RenormalizeKey(_Strict):
    key: str  # a boolean config key that says whether the top-k weights are renormalised


class DenseLayers(_Strict):
    list: str  # config key listing the dense layers
    step: str  # config key: with an empty list, layer i is sparse when (i + 1) % step == 0


class FfnParts(_Strict):
    gate: str
    up: str
    down: str


class SharedParts(FfnParts):
    router: str  # the one-row gate whose sigmoid scales the shared expert's output


class Required(_Strict):
    name: str
    like: str  # the tensor whose axis gives its length
    axis: int


class Refusal(_Strict):
    architecture: str
    key: str
    why: str


class FusedExperts(_Strict):
    """Where transformers 5 keeps a layer's experts once loaded: two parameters stacked over the experts."""
    gate_up: str  # [experts, gate rows then up rows, hidden]
    down: str  # [experts, hidden, expert_ffn]
    experts: FfnParts  # the checkpoint's per-expert tensors they are built from


class MoeFormat(_Strict):
    model_type: str
    sources: list[str]  # dense architectures this format can hold
    default_for: list[str] = []  # those for which it is the default
    keys: MoeKeys  # config keys that transformers 4 and 5 both read
    renormalize: Union[Literal["always"], RenormalizeKey]
    dense_layers: Optional[DenseLayers] = None  # none: every layer is sparse
    dense: FfnParts  # the dense source's FFN, by part
    router: str
    expert: FfnParts
    shared: Optional[SharedParts] = None
    forbidden: list[str] = []  # source tensors the format has no place for
    required: list[Required] = []  # tensors the format always has: zeros when the source lacks them
    set: dict[str, Any] = {}  # fixed config values
    refuse: list[Refusal] = []  # source config settings the format cannot express
    expert_row_bytes: int = 1  # an expert's width x bytes per value must be a multiple of this (framework kernels)


class PerLayerDefault(_Strict):
    value: str  # expression over i (the layer) and the config keys below
    config: dict[str, Any] = {}  # config key -> its default when the config leaves it out


class Spec(_Strict):
    family: str
    framework: Literal["transformers", "timm"]
    architectures: list[str]  # fnmatch patterns of the architecture names this spec reads
    norm: Literal["rms", "layer"]
    block: Literal["pre_norm", "post_norm"] = "pre_norm"
    branch_input: Literal["norm", "residual"] = "norm"  # what a layer's branches read
    norm_offset: float = 0.0  # the norms multiply by (offset + w), w the stored weight
    embedding_scale: Union[str, float, None] = None  # expression over sizes the model multiplies its embeddings by
    upcycle_refusal: Optional[str] = None  # why no MoE format can hold this family
    single_file: bool = False  # the framework reads no sharded weights
    tie: Optional[Tie] = None
    sizes: dict[str, Size]
    per_layer: list[str] = []  # config entries holding one value per layer
    layer_counts: list[str] = []  # config entries counting layers (the first N are special)
    per_layer_default: dict[str, PerLayerDefault] = {}  # per-layer entries the framework derives when absent
    optional_prefix: str = ""  # a tensor-name prefix some checkpoints of the family lack
    size_checks: dict[str, list[str]] = {}  # architecture pattern -> conditions over sizes the framework enforces
    ignore: list[str] = []  # tensor names to skip (buffers the framework rebuilds)
    # operation -> the methods grow can apply to a source of this family; none: every method of every operation
    operations: Optional[dict[Literal[OPERATIONS], list[str]]] = None
    # the model is built of this many stages (ConvNeXt): a size or tensor whose name holds {s} exists once per
    # stage, with {s} in its keys, axes and defaults standing for the stage ({s-1}: the stage before; a tensor
    # naming the stage before exists from the second stage on)
    stages: Optional[int] = Field(None, ge=1)
    tensors: list[Tensor]
    models: dict[str, ModelEntry] = {}  # architecture -> how transformers loads it (default: a causal LM)
    reserved_positions: int = 0  # positions the position ids skip (RoBERTa counts from past the padding index)
    moe_format: Optional[MoeFormat] = None  # how `grow upcycle` writes this format
    fused_experts: Optional[FusedExperts] = None  # how transformers 5 holds the per-expert tensors in memory
    # module path -> checkpoint tensor, where a framework version keeps a tensor under another name
    renamed: dict[str, str] = {}
    # an old checkpoint's tensor-name ending -> the ending the framework renames it to when it loads
    # (transformers' legacy LayerNorm.gamma / .beta); grow reads the old names and writes the current ones
    legacy_names: dict[str, str] = {}


@dataclass(frozen=True)
class Stages:
    """Where a staged spec's written-out entries come from: size name -> (kind, stage), e.g. hidden2 ->
    (hidden, 2), and the stage of each tensor (None for a tensor written once)."""

    of_size: dict[str, tuple[str, int]] = field(default_factory=dict)
    of_tensor: tuple[Optional[int], ...] = ()


def validate(data, file: Path) -> tuple[Spec, Stages]:
    """The spec in `data` (parsed YAML of `file`) with every {s} entry written out once per stage, and
    where those entries come from; or SpecError naming the file and every bad key."""
    if not isinstance(data, dict):
        raise SpecError(f"spec {file}: expected a mapping of keys at the top level, found {type(data).__name__}.")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"spec {file}: " + "; ".join(_describe(err, data) for err in e.errors()) + ".") from None
    stages = Stages()
    if spec.stages:
        missing = [f"sizes.{name}: missing; a spec with stages defines {' and '.join(STAGED_SIZES)}"
                   for name in STAGED_SIZES if name not in spec.sizes]
        if missing:
            raise SpecError(f"spec {file}: " + "; ".join(missing) + ".")
        spec, stages = _written_out(spec)
    problems = _references(spec, () if spec.stages else REQUIRED_SIZES)
    if problems:
        raise SpecError(f"spec {file}: " + "; ".join(problems) + ".")
    return spec, stages


def _written_out(spec: Spec) -> tuple[Spec, Stages]:
    """Every size and tensor written with {s}, once per stage."""
    n = spec.stages

    def fill(value, s: int):
        if isinstance(value, str):
            return value.replace(PREVIOUS_STAGE, str(s - 1)).replace(STAGE, str(s))
        if isinstance(value, list):
            return [fill(v, s) for v in value]
        return value

    sizes, of_size = {}, {}
    for name, size in spec.sizes.items():
        if STAGE not in name:
            sizes[name] = size
            continue
        for s in range(n):
            entry = {k: fill(v, s) for k, v in size.model_dump().items() if k != "last_mirror"}
            if s == n - 1:
                entry["mirror"] = entry["mirror"] + size.last_mirror
            sizes[fill(name, s)] = Size(**entry)
            of_size[fill(name, s)] = (name.replace(STAGE, ""), s)
    tensors, of_tensor = [], []
    for t in spec.tensors:
        text = t.name + " ".join(t.axes)
        if STAGE not in text and PREVIOUS_STAGE not in text:
            tensors.append(t)
            of_tensor.append(None)
            continue
        for s in range(1 if PREVIOUS_STAGE in text else 0, n):
            tensors.append(t.model_copy(update={k: fill(getattr(t, k), s) for k in ("name", "axes", "normalises", "norm")}))
            of_tensor.append(s)
    return spec.model_copy(update={"sizes": sizes, "tensors": tensors}), Stages(of_size, tuple(of_tensor))


def _describe(err: dict, data: dict) -> str:
    where = _location(err["loc"], data)
    if err["type"] == "extra_forbidden":
        return f"unknown key {where}"
    if err["type"] == "missing":
        return f"missing key {where}"
    return f"{where}: {err['msg']} (found {err.get('input')!r})"


def _location(loc: tuple, data: dict) -> str:
    """A pydantic error location as the spec author reads it: sizes.hidden.kye, tensors[3] (name).role."""
    text, node = "", data
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and "name" in node:
                text += f" ({node['name']})"
        elif part in ("[key]", "literal['always']", "RenormalizeKey", "str", "int", "none"):
            continue  # a mapping's key, or the branch of a union pydantic tried
        else:
            text += ("." if text else "") + str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return text


def _names(expr) -> set[str]:
    if isinstance(expr, (int, float)):
        return set()
    return {n.id for n in ast.walk(ast.parse(str(expr), mode="eval")) if isinstance(n, ast.Name)}


def _references(spec: Spec, required=REQUIRED_SIZES) -> list[str]:
    """Every size, space and tensor that one entry names and another must define."""
    out = []
    sizes = set(spec.sizes)
    out += [f"sizes.{name}: missing; every spec defines {', '.join(REQUIRED_SIZES)}"
            for name in required if name not in sizes]
    if "experts" in sizes and "top_k" not in sizes:
        out.append("sizes.top_k: missing; a spec with experts defines top_k, the experts each token uses")
    for name, size in spec.sizes.items():
        if size.key is None and size.default is None:
            out.append(f"sizes.{name}: needs a key or a default")
        try:
            unknown = _names(size.default) - sizes if size.default is not None else set()
        except SyntaxError:
            out.append(f"sizes.{name}.default: {size.default!r} is not an expression")
            continue
        out += [f"sizes.{name}.default uses size {u}, which sizes does not define" for u in sorted(unknown)]
        if size.ratio_of is not None and size.ratio_of not in sizes:
            out.append(f"sizes.{name}.ratio_of: size {size.ratio_of} is not defined under sizes")
        if size.last_mirror:
            out.append(f"sizes.{name}.last_mirror: only a size written with {{s}} in a spec with stages has a last stage")
    if spec.embedding_scale is not None:
        try:
            out += [f"embedding_scale uses size {u}, which sizes does not define"
                    for u in sorted(_names(spec.embedding_scale) - sizes)]
        except SyntaxError:
            out.append(f"embedding_scale: {spec.embedding_scale!r} is not an expression")
    out += [f"per_layer_default.{key}: {key} is not listed under per_layer" for key in spec.per_layer_default
            if key not in spec.per_layer]
    for pattern, conditions in spec.size_checks.items():
        for cond in conditions:
            try:
                unknown = _names(cond) - sizes
            except SyntaxError:
                out.append(f"size_checks.{pattern}: {cond!r} is not an expression")
                continue
            out += [f"size_checks.{pattern}: {cond!r} uses size {u}, which sizes does not define" for u in sorted(unknown)]
    names = set()
    for k, t in enumerate(spec.tensors):
        where = f"tensors[{k}] ({t.name})"
        if t.name in names:
            out.append(f"{where}: the tensor is listed twice")
        names.add(t.name)
        for axis in t.axes:
            for space in axis.split("|"):
                if space in DERIVED_SPACES:
                    out += [f"{where}.axes: space {space} needs size {n}, which sizes does not define"
                            for n in DERIVED_SPACES[space] if n not in sizes]
                elif space != FIXED_SPACE and space not in sizes:
                    out.append(f"{where}.axes: unknown space {space}; an axis is a size defined under sizes, "
                               f"{', '.join(DERIVED_SPACES)} or {FIXED_SPACE}")
        if t.normalises is not None and not any(n.name.startswith(t.normalises + ".") for n in spec.tensors):
            out.append(f"{where}.normalises: {t.normalises} is not a module of the tensors")
        if t.norm is not None and not any(n.name == t.norm and n.role in ("norm", "final_norm") for n in spec.tensors):
            out.append(f"{where}.norm: {t.norm} is not a norm weight among the tensors")
        if t.reads is not None and not 0 <= t.reads < len(t.axes):
            out.append(f"{where}.reads: {t.reads} is not one of its {len(t.axes)} axes")
        out += [f"{where}: unknown placeholder {p}; a name may use {{i}} (layer), {{e}} (expert), and {{s}} or "
                "{s-1} (stage) in a spec with stages"
                for p in PLACEHOLDER.findall(t.name) if p not in ("{i}", "{e}")]
        if "{e}" in t.name and ("{i}" not in t.name or "experts" not in sizes):
            out.append(f"{where}: an expert index {{e}} needs a layer index {{i}} and the size experts")
    if spec.fused_experts is not None:
        out += [f"fused_experts.experts.{p}: {v} is not one of the tensors"
                for p, v in spec.fused_experts.experts.model_dump().items() if v not in names]
    out += [f"renamed.{path}: {name} is not one of the tensors" for path, name in spec.renamed.items() if name not in names]
    out += [f"legacy_names.{old}: no tensor name ends in {new}" for old, new in spec.legacy_names.items()
            if not any(n.endswith(new) for n in names)]
    fmt = spec.moe_format
    if fmt is not None:
        patterns = {"router": fmt.router, **{f"expert.{p}": v for p, v in fmt.expert.model_dump().items()}}
        if fmt.shared is not None:
            patterns.update({f"shared.{p}": v for p, v in fmt.shared.model_dump().items()})
        out += [f"moe_format.{key}: {pattern} is not one of the tensors" for key, pattern in patterns.items()
                if pattern not in names]
        out += [f"moe_format.default_for: {a} is not in moe_format.sources" for a in fmt.default_for
                if a not in fmt.sources]
        for size in ("experts", "top_k", "expert_ffn", "shared_ffn"):
            key = getattr(fmt.keys, size)
            if key is not None and (size not in sizes or key not in (spec.sizes[size].key, *spec.sizes[size].aliases)):
                out.append(f"moe_format.keys.{size}: {key} is not the config key of sizes.{size}")
    return out

