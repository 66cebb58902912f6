"""ModelView: a Source read through its ArchSpec, every tensor classified and checked against the config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..checkpoint import Source, TensorInfo
from ..errors import GrowError
from .built import built_sizes
from .spec import ArchSpec, TensorSpec, architecture_name, spec_for


@dataclass(frozen=True)
class Entry:
    info: TensorInfo
    spec: TensorSpec
    layer: int | None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def expert(self) -> int | None:
        """The expert index of a per-expert tensor ({e} in its pattern), else None."""
        index = self.spec.regex.fullmatch(self.name).groupdict().get("e")
        return None if index is None else int(index)


class ModelView:
    def __init__(self, source: Source):
        self.source = source
        self.config = source.config
        where = str(source.path / "config.json")
        spec = spec_for(self.config, where)
        for info in list(source.tensors.values()):  # old names (BERT's LayerNorm.gamma) read as the framework reads them
            current = spec.current_name(info.name)
            if current != info.name and current not in source.tensors:
                source.tensors[current] = dataclasses.replace(info, name=current)
                del source.tensors[info.name]
        self.spec: ArchSpec = spec.for_names(source.tensors, architecture_name(self.config))
        self.sizes = self.spec.read_sizes(self.config, built_sizes(self.spec, self.config, where))
        self.tied = self.spec.tied(self.config)
        self.entries: list[Entry] = []
        for info in sorted(source.tensors.values(), key=lambda t: (t.file, t.offset)):
            if self.spec.ignored(info.name):
                continue
            found = self.spec.match(info.name)
            if found is None:
                raise GrowError(
                    f"tensor {info.name} in {info.file.name} is not part of the {self.spec.family} layout grow knows; "
                    f"the checkpoint has a variant that {self.spec.file.name} does not describe."
                )
            self.entries.append(Entry(info, *found))
        self.by_name = {e.name: e for e in self.entries}
        self._check()

    @property
    def architecture(self) -> str:
        return architecture_name(self.config)

    def _check(self) -> None:
        for e in self.entries:
            layers = self.sizes.get(e.spec.layer_size)
            if e.layer is not None and layers is not None and e.layer >= layers:
                raise GrowError(
                    f"tensor {e.name} belongs to layer {e.layer}, but config.json says the model has {layers} layers"
                    f"{self.spec.layers_label(e.spec.layer_size)}; fix config.json or the checkpoint."
                )
            if len(e.spec.axes) != len(e.info.shape):  # a layout of its own, not a size the config got wrong
                raise GrowError(
                    f"tensor {e.name} in {e.info.file.name} has {len(e.info.shape)} axes {list(e.info.shape)} where the "
                    f"{self.spec.family} layout grow knows has {len(e.spec.axes)}; the checkpoint is a variant that "
                    f"{self.spec.file.name} does not describe."
                )
            expected = self.expected_shape(e.spec, e.info.shape)
            if expected != e.info.shape:
                raise GrowError(
                    f"tensor {e.name} in {e.info.file.name} has shape {list(e.info.shape)} but config.json implies "
                    f"{list(expected)}; fix config.json or the checkpoint."
                )
        experts: dict[tuple[str, int | None], set[int]] = {}
        for e in self.entries:
            if e.expert is not None:
                experts.setdefault((e.spec.pattern, e.layer), set()).add(e.expert)
        for (pattern, layer), found in experts.items():
            if found != set(range(self.sizes["experts"])):
                raise GrowError(
                    f"layer {layer} holds experts {sorted(found)} of {pattern}, but config.json says there are "
                    f"{self.sizes['experts']}; fix config.json or the checkpoint."
                )
        heads = self.spec.by_role("head")
        if heads and not self.tied and not any(h.name() in self.by_name for h in heads):
            raise GrowError(
                f"config.json says the output head is not tied to the embedding, but the checkpoint has no "
                f"{heads[0].name()}; set {self.spec.tie_key} to true or add the tensor."
            )
        for group in self.spec.layer_groups:
            for i in range(self.sizes.get(group) or 0):
                if not self.layer(i, group):
                    raise GrowError(f"config.json says the model has {self.sizes[group]} layers"
                                    f"{self.spec.layers_label(group)}, but the checkpoint holds no tensor of layer {i}.")

    def expected_shape(self, spec: TensorSpec, actual: tuple[int, ...], sizes: dict[str, int] | None = None) -> tuple[int, ...]:
        sizes = sizes or self.sizes
        return tuple(
            self.spec.axis_size(spaces, sizes) or actual[k]  # "fixed" axes keep the checkpoint's size
            for k, spaces in enumerate(spec.axes)
        )

    def layer(self, i: int, group: str = "layers") -> list[Entry]:
        """The tensors of layer i (of one stage, where group names that stage's layer count)."""
        return [e for e in self.entries if e.layer == i and e.spec.layer_size == group]

    @property
    def layer_modules(self) -> list[str]:
        """The module path of every block, stage after stage in staged models."""
        return [self.spec.layer_module(i, g) for g in self.spec.layer_groups for i in range(self.sizes[g])]

    def globals(self) -> list[Entry]:
        return [e for e in self.entries if e.layer is None]
