"""MoE output formats: the `moe_format` section of an architecture's spec file (names, config keys, routing);
schema.MoeFormat defines its keys."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from .schema import DenseLayers
from .spec import all_specs, get_path, set_path


@dataclass(frozen=True)
class MoeFormat:
    name: str  # the spec's family
    architecture: str
    model_type: str
    sources: tuple[str, ...]
    default_for: tuple[str, ...]
    keys: dict  # experts, top_k, expert_ffn[, shared_ffn] -> config key
    renormalize: str | dict  # "always", or {"key": K}: a boolean config key grow sets
    dense_layers: dict | None  # {"list": key, "step": key}; None: every layer is sparse
    dense: dict  # part (gate, up, down) -> source tensor pattern
    router: str
    expert: dict  # part -> pattern with {i} and {e}
    shared: dict | None  # part -> pattern, plus "router" for the shared expert's gate
    forbidden: tuple[str, ...]
    required: tuple[dict, ...]
    set: dict
    refuse: tuple[dict, ...]
    expert_row_bytes: int  # an expert's width times the output's bytes per value must be a multiple of this

    @property
    def renormalize_key(self) -> str | None:
        return self.renormalize.get("key") if isinstance(self.renormalize, dict) else None


@cache
def moe_formats() -> dict[str, MoeFormat]:
    out = {}
    for spec in all_specs():
        if spec.model.moe_format is None:
            continue
        d = spec.model.moe_format.model_dump()  # validated by schema.MoeFormat: every key present
        out[spec.family] = MoeFormat(
            name=spec.family, architecture=spec.architectures[0], model_type=d["model_type"],
            sources=tuple(d["sources"]), default_for=tuple(d["default_for"]),
            keys={k: v for k, v in d["keys"].items() if v is not None}, renormalize=d["renormalize"],
            dense_layers=d["dense_layers"], dense=d["dense"], router=d["router"], expert=d["expert"], shared=d["shared"],
            forbidden=tuple(d["forbidden"]), required=tuple(d["required"]), set=d["set"], refuse=tuple(d["refuse"]),
            expert_row_bytes=d["expert_row_bytes"],
        )
    return out


def remap_dense_layers(config: dict, keys: DenseLayers, layers: int, layer_src: list[int]) -> None:
    """Which layers stay dense, for a model whose layer i derives from source layer layer_src[i]: listed one by
    one (step 1), since a step no longer lines up once layers are copied or dropped."""
    listed = get_path(config, keys.list) or []
    step = get_path(config, keys.step) or 1
    dense = {i for i in range(layers) if i in listed or (i + 1) % step}
    if dense:  # every layer sparse stays every layer sparse
        set_path(config, keys.list, [i for i, j in enumerate(layer_src) if j in dense])
        set_path(config, keys.step, 1)
