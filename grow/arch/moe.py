"""MoE output formats: tensor names, config keys and routing facts of each, read from specs/moe/*.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import yaml

from .spec import SPEC_DIR

MOE_DIR = SPEC_DIR / "moe"


@dataclass(frozen=True)
class MoeFormat:
    name: str
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

    @property
    def renormalize_key(self) -> str | None:
        return self.renormalize.get("key") if isinstance(self.renormalize, dict) else None


@cache
def moe_formats() -> dict[str, MoeFormat]:
    out = {}
    for path in sorted(MOE_DIR.glob("*.yaml")):
        d = yaml.safe_load(path.read_text())
        out[d["format"]] = MoeFormat(
            name=d["format"], architecture=d["architecture"], model_type=d["model_type"],
            sources=tuple(d["sources"]), default_for=tuple(d.get("default_for", ())), keys=d["keys"],
            renormalize=d["renormalize"], dense_layers=d.get("dense_layers"), dense=d["dense"], router=d["router"],
            expert=d["expert"], shared=d.get("shared"), forbidden=tuple(d.get("forbidden", ())),
            required=tuple(d.get("required", ())), set=d.get("set", {}), refuse=tuple(d.get("refuse", ())),
        )
    return out
