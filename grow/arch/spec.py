"""ArchSpec: which tensor is what, and which space each axis belongs to, read from specs/*.yaml."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

from ..errors import GrowError, UsageError
from .schema import DERIVED_SPACES, FIXED_SPACE, ModelEntry, SpecError, validate

SPEC_DIR = Path(__file__).parent / "specs"

# Roles of tensors that write into the residual stream without reading it.
RESIDUAL_SOURCES = ("embedding", "position", "patch", "token")
# Roles of elementwise norm parameters (weights and LayerNorm biases): norms of a branch's input, of the
# residual before the head, of queries and keys, and of a branch's output before it is added (post_norm).
NORM_ROLES = ("norm", "final_norm", "qk_norm", "post_norm")


@dataclass(frozen=True)
class TensorSpec:
    pattern: str  # tensor name, "{i}" standing for the layer index
    axes: tuple[tuple[str, ...], ...]  # per axis, the spaces concatenated along it (usually one)
    reads: int | None = None  # the fan-in axis: the one contracted with the input
    role: str = "weight"
    regex: re.Pattern = field(compare=False, repr=False, default=None)
    interleaved: bool = False  # a fused axis stored head by head ([head 0: q, k, v], [head 1: ...])
    normalises: str | None = None  # a q/k norm over the whole projection: the module whose output it normalises
    norm: str | None = None  # for a reader of the residual: the weight of the norm whose output it reads
    closes_block: bool = False  # a post-LN block's last norm: its output is the block's output
    layer_size: str = "layers"  # the size that counts the layers "{i}" runs over (a stage's own in staged models)
    residual: tuple[str, ...] = ("hidden",)  # the spaces of the residual stream (one per stage in staged models)

    def norm_name(self, layer: int | None = None) -> str | None:
        return None if self.norm is None else self.norm.replace("{i}", str(layer))

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.pattern

    def name(self, layer: int | None = None, expert: int | None = None) -> str:
        """The tensor's name in layer `layer` (and for expert `expert`, when the pattern has {e})."""
        name = self.pattern.replace("{i}", str(layer)) if self.per_layer else self.pattern
        return name if expert is None else name.replace("{e}", str(expert))

    @property
    def writes_residual(self) -> bool:
        """True for tensors whose output lands in the residual stream (embeddings, output projections)."""
        if self.role in RESIDUAL_SOURCES:
            return True
        if self.role != "weight":
            return False
        return any(len(ax) == 1 and ax[0] in self.residual for i, ax in enumerate(self.axes) if i != self.reads)


@dataclass(frozen=True)
class SizeKey:
    key: str | None  # dotted path into config.json, or None when the size is implied
    default: str | None = None  # expression over other sizes, used when the key is absent or null
    ratio_of: str | None = None  # the config stores size / sizes[ratio_of]
    mirror: tuple[str, ...] = ()  # other config paths that hold the same value
    aliases: tuple[str, ...] = ()  # other config paths read when `key` is absent (names that changed over versions)
    # attribute path of the model the framework builds from the config (see arch/built.py), read when `key`
    # is absent: the architecture's registered default, which timm leaves out of config.json
    built: str | None = None
    kind: str = ""  # what the size is (hidden, ffn, layers...): its name, less the stage number of a staged size
    stage: int | None = None  # the stage of a per-stage size (spec `stages`)


class ArchSpec:
    """One spec file, validated by schema.Spec (the one place that defines what a spec may say)."""

    def __init__(self, data: dict, source: Path, module_prefix: str = ""):
        self.file = source
        model, stages = validate(data, source)  # sizes and tensors written with {s} come once per stage
        self.model = model
        # models built of stages (ConvNeXt): each stage has its own residual width, FFN width and depth
        self.stages: int | None = model.stages
        self.family: str = model.family
        self.framework: str = model.framework
        self.architectures: list[str] = model.architectures
        self.norm: str = model.norm
        self.block: str = model.block
        # what a layer's branches read: the normalised residual ("norm"), or the residual itself ("residual")
        self.branch_input: str = model.branch_input
        # the stored norm weight is w but the norm multiplies by (offset + w): operators act on offset + w
        self.norm_offset: float = model.norm_offset
        # the model multiplies its token embeddings by this expression over the sizes (e.g. hidden ** 0.5)
        self.embedding_scale: str | None = _expr(model.embedding_scale)
        # why no MoE format can hold this family (grow upcycle refuses it with this reason)
        self.upcycle_refusal: str | None = model.upcycle_refusal
        self.single_file: bool = model.single_file  # the framework reads no sharded weights
        self.tie_key: str | None = model.tie.key if model.tie else None
        self.tie_default: bool = bool(model.tie and model.tie.default)
        self.sizes: dict[str, SizeKey] = {
            k: SizeKey(v.key, _expr(v.default), v.ratio_of, tuple(v.mirror), tuple(v.aliases), v.built,
                       *stages.of_size.get(k, (k, None)))
            for k, v in model.sizes.items()
        }
        # the spaces that are FFN widths: ffn (one per stage), and any other a spec marks (an expert's)
        self.ffn_spaces: list[str] = [k for k, v in model.sizes.items() if self.sizes[k].kind == "ffn" or v.ffn]
        self.per_layer_keys: list[str] = model.per_layer
        self.layer_count_keys: list[str] = model.layer_counts
        # per-layer entries that the framework derives when the config leaves them out:
        # key -> {value: expression over i (the layer) and config keys, config: {config key: default}}
        self.per_layer_defaults: dict[str, dict] = {k: v.model_dump() for k, v in model.per_layer_default.items()}
        self.optional_prefix: str = model.optional_prefix
        # the prefix the model's module paths have but this checkpoint's tensor names lack (see for_names)
        self.module_prefix: str = module_prefix
        # architecture pattern -> conditions over sizes that the framework enforces when it loads a config
        self.size_checks: dict[str, list[str]] = model.size_checks
        residual = tuple(self.spaces_of("hidden"))
        self.tensors = [TensorSpec(t.name, tuple(tuple(a.split("|")) for a in t.axes), t.reads, t.role,
                                   _pattern_regex(t.name), t.interleaved, t.normalises, t.norm,
                                   t.closes_block, "layers" if stage is None else self.spaces_of("layers")[stage],
                                   residual)
                        for t, stage in zip(model.tensors, stages.of_tensor or [None] * len(model.tensors))]
        # the sizes that count layers: "layers", or one per stage
        self.layer_groups: list[str] = list(dict.fromkeys(t.layer_size for t in self.tensors if t.per_layer))
        self.ignore = [_pattern_regex(p) for p in model.ignore]
        # operation -> the methods grow can apply to a source of this family; None: all of them
        self.operations: dict[str, list[str]] | None = model.operations
        # architecture -> how transformers loads it and what verify compares (schema.ModelEntry)
        self.models: dict[str, dict] = {k: v.model_dump() for k, v in model.models.items()}
        # positions the model's position ids skip (RoBERTa counts from past the padding index)
        self.reserved_positions: int = model.reserved_positions
        self.data = data  # the file as written (for_names rewrites it)

    def spaces_of(self, kind: str) -> list[str]:
        """The sizes of one kind: [kind] itself, or one per stage in staged models (hidden0, hidden1, ...)."""
        return [name for name, sk in self.sizes.items() if sk.kind == kind]

    def layers_label(self, group: str) -> str:
        """How a message names the layers that one layer count counts: "" or " in stage 2"."""
        stage = self.sizes[group].stage if group in self.sizes else None
        return "" if stage is None else f" in stage {stage}"

    def model_entry(self, architecture: str | None) -> dict:
        """How transformers loads `architecture`: auto_class, output (what verify compares) and output_axis,
        objective (causal_lm, masked_lm, or None for a bare encoder), base_model (no head, no module prefix)."""
        return self.models.get(architecture) or ModelEntry().model_dump()

    def for_names(self, names, architecture: str | None = None) -> "ArchSpec":
        """This spec, with its optional prefix dropped when the checkpoint's names lack it, so that
        output names follow the source's convention. A base model (BertModel) lacks the prefix in its
        module paths too; a model with a head (GPT2LMHeadModel) keeps it there."""
        p = self.optional_prefix
        if not p or any(n.startswith(p) for n in names):
            return self
        data = dict(self.data, optional_prefix="")
        data["tensors"] = [dict(t, name=t["name"].removeprefix(p), **({"norm": t["norm"].removeprefix(p)} if "norm" in t else {}))
                           for t in data["tensors"]]
        data["ignore"] = [i.removeprefix(p) for i in data.get("ignore", [])]
        return ArchSpec(data, self.file, module_prefix="" if self.model_entry(architecture)["base_model"] else p)

    def current_name(self, name: str) -> str:
        """A tensor name as the framework reads it: an old checkpoint's ending (spec legacy_names) renamed."""
        for old, new in self.model.legacy_names.items():
            if name.endswith(old):
                return name[: -len(old)] + new
        return name

    def module_path(self, name: str) -> str:
        """Where a tensor (or the module named by a tensor name without its suffix) lives in the model."""
        return self.module_prefix + name

    def tensor_name(self, path: str) -> str:
        """The checkpoint's name for the parameter at a module path (the inverse of module_path)."""
        return path.removeprefix(self.module_prefix)

    def layer_module(self, layer: int, group: str = "layers") -> str:
        """The module path of one block, e.g. model.layers.3 (stages.2.blocks.3 for group layers2): the
        per-layer tensor names up to the index."""
        pattern = next(t.pattern for t in self.tensors if t.per_layer and t.layer_size == group)
        return self.module_path(pattern[: pattern.index("{i}")] + str(layer))

    # ---- tensors -------------------------------------------------------------------------
    def match(self, name: str) -> tuple[TensorSpec, int | None] | None:
        for t in self.tensors:
            m = t.regex.fullmatch(name)
            if m:
                return t, int(m.group(1)) if t.per_layer else None
        return None

    def ignored(self, name: str) -> bool:
        return any(r.fullmatch(name) for r in self.ignore)

    def by_role(self, role: str) -> list[TensorSpec]:
        return [t for t in self.tensors if t.role == role]

    def per_layer_values(self, key: str, config: dict, layers: int) -> list | None:
        """One value per layer for a per-layer config entry: the config's own list, or the framework's default."""
        values = get_path(config, key)
        if values is None and key in self.per_layer_defaults:
            rule = self.per_layer_defaults[key]
            names = {k: get_path(config, k) if get_path(config, k) is not None else v
                     for k, v in rule.get("config", {}).items()}
            values = [eval(rule["value"], {"__builtins__": {}}, dict(names, i=i)) for i in range(layers)]  # spec data
        return values if isinstance(values, list) else None

    def value_offset(self, t: TensorSpec) -> float:
        """What the model adds to this tensor's stored values before using them (norms of the form offset + w)."""
        return self.norm_offset if t.role in NORM_ROLES and not t.pattern.endswith("bias") else 0.0

    def embedding_rescale(self, sizes: dict[str, int], new_sizes: dict[str, int]) -> float:
        """The factor on the stored embedding that keeps the scaled embedding the model adds to the residual
        as it was, when the model's embedding scale depends on sizes that change."""
        if self.embedding_scale is None:
            return 1.0
        return _eval_default(self.embedding_scale, sizes) / _eval_default(self.embedding_scale, new_sizes)

    # ---- sizes and config ------------------------------------------------------------------
    def read_sizes(self, config: dict, built: dict[str, int] | None = None) -> dict[str, int]:
        """Every size: from its config key, else from the built model (`built`, see arch/built.py), else
        from its default expression over the other sizes."""
        built = built or {}
        sizes: dict[str, int] = {}
        pending = dict(self.sizes)
        for _ in range(len(pending) + 1):
            for name, sk in list(pending.items()):
                value = get_path(config, sk.key) if sk.key else None
                for alias in sk.aliases:
                    value = get_path(config, alias) if value is None else value
                if value is not None and sk.ratio_of:
                    if sk.ratio_of not in sizes:
                        continue
                    value = int(sizes[sk.ratio_of] * value)
                if value is None:
                    value = built.get(name)  # the framework's value is the size itself, never a ratio
                if value is None:
                    if sk.default is None:
                        raise GrowError(f"config.json has no {sk.key}, which a {self.family} model needs.")
                    try:
                        value = eval(sk.default, {"__builtins__": {}}, dict(sizes))  # spec data, not user input
                    except NameError:
                        continue
                if not isinstance(value, (int, float)) or int(value) != value or value < 0:
                    raise GrowError(f"config.json has {sk.key}={value!r}; it must be a whole number.")
                sizes[name] = int(value)
                del pending[name]
        if pending:
            raise GrowError(f"spec {self.file.name} has sizes that depend on each other: {sorted(pending)}.")
        return sizes

    def implied(self, name: str, sizes: dict[str, int]) -> int:
        """The value of a size that the config does not hold, from its default over the other sizes."""
        return int(_eval_default(self.sizes[name].default, sizes))

    def space_size(self, space: str, sizes: dict[str, int]) -> int | None:
        """Length of one space's axis; None for axes that no operator changes."""
        if space == FIXED_SPACE:
            return None
        if space in DERIVED_SPACES:
            a, b = DERIVED_SPACES[space]
            return sizes[a] * sizes[b]
        return sizes[space]

    def axis_size(self, spaces: tuple[str, ...], sizes: dict[str, int]) -> int | None:
        parts = [self.space_size(s, sizes) for s in spaces]
        return None if None in parts else sum(parts)

    def failed_checks(self, architecture: str, sizes: dict[str, int]) -> list[str]:
        """The conditions in size_checks that these sizes break (the framework would refuse the config)."""
        return [cond for pat, conds in self.size_checks.items() if fnmatch.fnmatchcase(architecture, pat)
                for cond in conds if not eval(cond, {"__builtins__": {}}, dict(sizes))]  # spec data, not user input

    def tied(self, config: dict) -> bool:
        if self.tie_key is None:
            return False
        value = get_path(config, self.tie_key)
        return self.tie_default if value is None else bool(value)

    def write_sizes(self, config: dict, old: dict[str, int], new: dict[str, int]) -> dict:
        """A copy of config with every size in `new` written where the config keeps it."""
        import copy

        out = copy.deepcopy(config)
        for name, sk in self.sizes.items():
            value = new[name]
            implied = _eval_default(sk.default, new)
            stored = get_path(config, sk.key) if sk.key else None
            if sk.key is None:
                if implied != value:
                    raise UsageError(
                        f"a {self.family} model has no separate {name} (it is always {sk.default}); "
                        f"leave {name} at {implied}."
                    )
                continue
            if sk.built:
                # the framework fills an absent key from the architecture's defaults: record every size
                # that changed (and every ratio whose base changed), and keep the ones the user gave current
                related = (name, sk.ratio_of) if sk.ratio_of else (name,)
                if stored is None and all(old[k] == new[k] for k in related):
                    continue
            elif stored is None and implied == value and not holds_path(config, sk.key):
                # the default still gives the right value: keep the config as terse as it was (a null the
                # config holds is written out: transformers 4.57's Qwen2-MoE reads head_dim: null as it is)
                continue
            if sk.stage is not None and sk.key.endswith(f".{sk.stage}"):
                whole = sk.key.rsplit(".", 1)[0]
                if not isinstance(get_path(out, whole), list):  # the framework's default list, written out whole
                    set_path(out, whole, [old[n] for n in self.spaces_of(sk.kind)])
            if sk.ratio_of:
                ratio = value / new[sk.ratio_of]
                if int(new[sk.ratio_of] * ratio) != value:
                    ratio = (value + 0.5) / new[sk.ratio_of]
                set_path(out, sk.key, ratio)
            else:
                set_path(out, sk.key, value)
            for m in sk.mirror:
                if get_path(config, m) is not None:
                    set_path(out, m, value)
        return out

    def __repr__(self) -> str:
        return f"ArchSpec({self.family})"


def _pattern_regex(pattern: str) -> re.Pattern:
    # "{i}" is the layer (group 1); "{e}" an expert index within it (group "e")
    return re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(\d+)").replace(re.escape("{e}"), r"(?P<e>\d+)"))


def _expr(value) -> str | None:
    return None if value is None else str(value)


def _eval_default(expr: str | None, sizes: dict[str, int]):
    if expr is None:
        return None
    return eval(expr, {"__builtins__": {}}, dict(sizes))


def get_path(config: dict, path: str | None):
    """The value at a dotted path; a number indexes a list (model_args.dims.2)."""
    node = config
    for part in (path or "").split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def holds_path(config: dict, path: str) -> bool:
    """Whether config has an entry at path, null or not."""
    *parents, last = path.split(".")
    node = get_path(config, ".".join(parents)) if parents else config
    return isinstance(node, dict) and last in node


def set_path(config: dict, path: str, value) -> None:
    """Set the value at a dotted path (creating objects on the way); a number indexes a list that exists."""
    parts = path.split(".")
    node = config
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


# libyaml's parser where PyYAML has it: the pure-Python one spends most of `grow inspect`'s start-up on the specs
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_spec(path: Path) -> ArchSpec:
    """One spec file, validated (SpecError names the file and the key when it breaks the schema)."""
    return ArchSpec(_parse(path), path)


def _parse(path: Path):
    try:
        return yaml.load(path.read_text(), Loader=SAFE_LOADER)
    except yaml.YAMLError as e:
        raise SpecError(f"spec {path}: not valid YAML ({str(e).splitlines()[0]}).") from None


def load_specs(folder: Path) -> tuple[ArchSpec, ...]:
    return _one_per_family(tuple(load_spec(p) for p in sorted(folder.glob("*.yaml"))))


def _one_per_family(specs: tuple[ArchSpec, ...]) -> tuple[ArchSpec, ...]:
    families: dict[str, Path] = {}
    for s in specs:
        if s.family in families:
            raise SpecError(f"spec {s.file}: family {s.family} is already defined by {families[s.family]}.")
        families[s.family] = s.file
    return specs


@cache
def _shipped_paths() -> tuple[Path, ...]:
    return tuple(sorted(SPEC_DIR.glob("*.yaml")))


@cache
def _shipped_data(path: Path):
    return _parse(path)


@cache
def _shipped(path: Path) -> ArchSpec:
    return ArchSpec(_shipped_data(path), path)


@cache
def all_specs() -> tuple[ArchSpec, ...]:
    return _one_per_family(tuple(_shipped(p) for p in _shipped_paths()))


def supported_architectures() -> list[str]:
    return [a for s in all_specs() for a in s.architectures]


def architecture_name(config: dict) -> str | None:
    if isinstance(config.get("architecture"), str):  # timm
        return config["architecture"]
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return None


def spec_for(config: dict, where: str = "config.json") -> ArchSpec:
    arch = architecture_name(config)
    if arch is None:
        raise GrowError(
            f"{where} names no architecture (no 'architectures' list, nor timm's 'architecture'); "
            "add it, e.g. \"architectures\": [\"LlamaForCausalLM\"]."
        )
    # matched on each file's architectures as written, so that only the spec that is used is validated
    # and built (all fifteen took 50 ms, more than the rest of what `grow inspect` does once imported)
    for path in _shipped_paths():
        data = _shipped_data(path)
        patterns = data.get("architectures") if isinstance(data, dict) else None
        if not (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)):
            patterns = _shipped(path).architectures  # SpecError: the file breaks the schema
        if any(fnmatch.fnmatchcase(arch, pat) for pat in patterns):
            return _shipped(path)
    raise GrowError(f"{where} names architecture {arch}, which grow does not support; supported: {', '.join(supported_architectures())}.")
