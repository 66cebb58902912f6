"""The spec file format (grow/arch/specs/*.yaml), validated: every key, role and space a spec may use.

A spec that uses a key this schema does not define, a role or space nobody defines, or a size that no
entry under `sizes` provides is refused with the file and the key named. To add a key: add a field to
the dataclass of its section below (with a default if older specs lack it), then read it in ArchSpec.

Each section is a read-only dataclass whose fields are the keys it may hold; `validate` checks a parsed
file against them in plain Python (importing pydantic took about as long as all of `grow inspect` does now)."""

from __future__ import annotations

import ast
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, Optional, Union

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


class _Strict:
    """A section of a spec file: a dataclass (made by @section) whose fields are the keys it may hold,
    read-only once made. Its methods are written once here: @dataclass(frozen=True) generates them for
    every section, which added some 30 ms to importing the schema (to every grow command)."""

    def __init__(self, **values):
        fields = dataclasses.fields(self)
        unknown = values.keys() - {f.name for f in fields}
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        for f in fields:
            if f.name in values:
                value = values[f.name]
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                raise TypeError(f"{type(self).__name__} needs {f.name}")
            object.__setattr__(self, f.name, value)

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name):
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and self.model_dump() == other.model_dump()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in dataclasses.fields(self))})"

    def model_dump(self) -> dict:
        """The section as plain data: nested sections as dicts, lists and dicts copied."""
        return dataclasses.asdict(self)


section = dataclass(init=False, repr=False, eq=False)


@section
class Tie(_Strict):
    key: str  # boolean config key that says whether the head is the embedding
    default: bool  # its value when the config leaves it out


@section
class Size(_Strict):
    key: Optional[str] = None  # dotted path into config.json; none: the size is implied by `default`
    default: Union[str, int, None] = None  # expression over other sizes, used when the key is absent or null
    ratio_of: Optional[str] = None  # the config stores size / sizes[ratio_of]
    mirror: list[str] = field(default_factory=list)  # other config paths that hold the same value
    aliases: list[str] = field(default_factory=list)  # config paths read when `key` is absent (names that changed over versions)
    ffn: bool = False  # an FFN width besides `ffn` itself (an expert's): operators change it as they change the FFN
    # attribute path of the model the framework builds from the config (arch/built.py), read when `key` is
    # absent: the architecture's registered default, which timm leaves out of config.json
    built: Optional[str] = None
    last_mirror: list[str] = field(default_factory=list)  # a size written with {s}: config paths that hold the last stage's value


@section
class Tensor(_Strict):
    name: str  # "{i}" stands for the layer index, "{e}" for an expert index
    axes: list[str]  # per axis, a space, or spaces concatenated along it joined by "|"
    reads: Optional[int] = None  # the fan-in axis: the one contracted with the input
    role: Literal[tuple(ROLES)] = "weight"
    interleaved: bool = False  # a fused axis stored head by head ([head 0: q, k, v], [head 1: ...])
    normalises: Optional[str] = None  # a q/k norm over the whole projection: the module whose output it normalises
    norm: Optional[str] = None  # a reader of the residual: the weight of the norm whose output it reads
    closes_block: bool = False  # a post-LN block's last norm: its output is the block's output


@section
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


@section
class MoeKeys(_Strict):
    experts: str
    top_k: str
    expert_ffn: str
    shared_ffn: Optional[str] = None


@section
class RenormalizeKey(_Strict):
    key: str  # a boolean config key that says whether the top-k weights are renormalised


@section
class DenseLayers(_Strict):
    list: str  # config key listing the dense layers
    step: str  # config key: with an empty list, layer i is sparse when (i + 1) % step == 0


@section
class FfnParts(_Strict):
    gate: str
    up: str
    down: str


@section
class SharedParts(FfnParts):
    router: str  # the one-row gate whose sigmoid scales the shared expert's output


@section
class Required(_Strict):
    name: str
    like: str  # the tensor whose axis gives its length
    axis: int


@section
class Refusal(_Strict):
    architecture: str
    key: str
    why: str


@section
class FusedExperts(_Strict):
    """Where transformers 5 keeps a layer's experts once loaded: two parameters stacked over the experts."""
    gate_up: str  # [experts, gate rows then up rows, hidden]
    down: str  # [experts, hidden, expert_ffn]
    experts: FfnParts  # the checkpoint's per-expert tensors they are built from


@section
class MoeFormat(_Strict):
    model_type: str
    sources: list[str]  # dense architectures this format can hold
    default_for: list[str] = field(default_factory=list)  # those for which it is the default
    keys: MoeKeys  # config keys that transformers 4 and 5 both read
    renormalize: Union[Literal["always"], RenormalizeKey]
    dense_layers: Optional[DenseLayers] = None  # none: every layer is sparse
    dense: FfnParts  # the dense source's FFN, by part
    router: str
    expert: FfnParts
    shared: Optional[SharedParts] = None
    forbidden: list[str] = field(default_factory=list)  # source tensors the format has no place for
    required: list[Required] = field(default_factory=list)  # tensors the format always has: zeros when the source lacks them
    set: dict[str, Any] = field(default_factory=dict)  # fixed config values
    refuse: list[Refusal] = field(default_factory=list)  # source config settings the format cannot express
    expert_row_bytes: int = 1  # an expert's width x bytes per value must be a multiple of this (framework kernels)


@section
class PerLayerDefault(_Strict):
    value: str  # expression over i (the layer) and the config keys below
    config: dict[str, Any] = field(default_factory=dict)  # config key -> its default when the config leaves it out


@section
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
    per_layer: list[str] = field(default_factory=list)  # config entries holding one value per layer
    layer_counts: list[str] = field(default_factory=list)  # config entries counting layers (the first N are special)
    per_layer_default: dict[str, PerLayerDefault] = field(default_factory=dict)  # per-layer entries the framework derives when absent
    optional_prefix: str = ""  # a tensor-name prefix some checkpoints of the family lack
    size_checks: dict[str, list[str]] = field(default_factory=dict)  # architecture pattern -> conditions over sizes the framework enforces
    ignore: list[str] = field(default_factory=list)  # tensor names to skip (buffers the framework rebuilds)
    # operation -> the methods grow can apply to a source of this family; none: every method of every operation
    operations: Optional[dict[Literal[OPERATIONS], list[str]]] = None
    # the model is built of this many stages (ConvNeXt): a size or tensor whose name holds {s} exists once per
    # stage, with {s} in its keys, axes and defaults standing for the stage ({s-1}: the stage before; a tensor
    # naming the stage before exists from the second stage on)
    stages: Optional[int] = field(default=None, metadata={"ge": 1})
    tensors: list[Tensor]
    models: dict[str, ModelEntry] = field(default_factory=dict)  # architecture -> how transformers loads it (default: a causal LM)
    reserved_positions: int = 0  # positions the position ids skip (RoBERTa counts from past the padding index)
    moe_format: Optional[MoeFormat] = None  # how `grow upcycle` writes this format
    fused_experts: Optional[FusedExperts] = None  # how transformers 5 holds the per-expert tensors in memory
    # module path -> checkpoint tensor, where a framework version keeps a tensor under another name
    renamed: dict[str, str] = field(default_factory=dict)
    # an old checkpoint's tensor-name ending -> the ending the framework renames it to when it loads
    # (transformers' legacy LayerNorm.gamma / .beta); grow reads the old names and writes the current ones
    legacy_names: dict[str, str] = field(default_factory=dict)


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
    problems: list[str] = []
    spec = _section(Spec, data, "", problems)
    if problems:
        raise SpecError(f"spec {file}: " + "; ".join(problems) + ".")
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
            tensors.append(dataclasses.replace(t, **{k: fill(getattr(t, k), s) for k in ("name", "axes", "normalises", "norm")}))
            of_tensor.append(s)
    return dataclasses.replace(spec, sizes=sizes, tensors=tensors), Stages(of_size, tuple(of_tensor))


# ---- checking parsed YAML against the sections ---------------------------------------------------
# Each checker returns the value as the section holds it, or _BAD after adding one problem per bad key to
# `problems` ("unknown key sizes.ffn.kye", "tensors[3] (name).role: Input should be ... (found 'nrom')").

_BAD = object()
_TYPES = {str: "a valid string", int: "a valid integer", float: "a valid number", bool: "a valid boolean"}


@cache
def _fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _section(cls, data, where: str, problems: list[str]):
    if not isinstance(data, dict):
        problems.append(f"{where}: Input should be {_expected(cls)} (found {data!r})")
        return _BAD
    values, before = {}, len(problems)
    for f, hint in _fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"missing key {key}")
            continue
        value = _value(hint, data[f.name], key, problems)
        if "ge" in f.metadata and isinstance(value, int) and value < f.metadata["ge"]:
            problems.append(f"{key}: Input should be greater than or equal to {f.metadata['ge']} (found {value!r})")
        values[f.name] = value
    known = {f.name for f in dataclasses.fields(cls)}
    problems += [f"unknown key {where}.{k}" if where else f"unknown key {k}" for k in data if k not in known]
    return cls(**values) if len(problems) == before else _BAD


def _value(hint, value, where: str, problems: list[str]):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, _Strict):
        return _section(hint, value, where, problems)
    if origin in (Union, types.UnionType):
        return _union(args, value, where, problems)
    if origin is list and isinstance(value, list):
        items = [_value(args[0], v, f"{where}[{i}]" + (f" ({v['name']})" if isinstance(v, dict) and "name" in v else ""),
                        problems) for i, v in enumerate(value)]
        return _BAD if any(v is _BAD for v in items) else items
    if origin is dict and isinstance(value, dict):
        items = [(_value(args[0], k, f"{where}.{k}", problems), _value(args[1], v, f"{where}.{k}", problems))
                 for k, v in value.items()]
        return _BAD if any(k is _BAD or v is _BAD for k, v in items) else dict(items)
    if origin is Literal and value in args:
        return value
    if hint is float and type(value) is int:
        return float(value)
    if hint in _TYPES and type(value) is hint:
        return value
    problems.append(f"{where}: Input should be {_expected(hint)} (found {value!r})")
    return _BAD


def _union(args: tuple, value, where: str, problems: list[str]):
    """The first branch the value fits; else the problems inside the one branch of the value's shape (a
    mapping meant for a section or a dictionary, a list), or one sentence naming every branch."""
    if value is None and type(None) in args:
        return None
    branches = [a for a in args if a is not type(None)]
    for hint in branches:
        found: list[str] = []
        out = _value(hint, value, where, found)
        if not found:
            return out
    shaped = [h for h in branches if _shape(h) is type(value)]
    if len(shaped) == 1:
        return _value(shaped[0], value, where, problems)
    problems.append(f"{where}: Input should be {' or '.join(_expected(h) for h in branches)} (found {value!r})")
    return _BAD


def _shape(hint) -> type | None:
    """dict for a section or a dictionary, list for a list: the container a value of this type is."""
    if isinstance(hint, type) and issubclass(hint, _Strict):
        return dict
    return typing.get_origin(hint) if typing.get_origin(hint) in (list, dict) else None


def _expected(hint) -> str:
    """What a value of this type is, as an error message says it: "a valid string", "'rms' or 'layer'"."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = [repr(a) for a in typing.get_args(hint)]
        return choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + " or " + choices[-1]
    if origin in (list, dict):
        return f"a valid {'list' if origin is list else 'dictionary'}"
    if isinstance(hint, type) and issubclass(hint, _Strict):
        return "a mapping of keys"
    return _TYPES.get(hint, str(hint))


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

