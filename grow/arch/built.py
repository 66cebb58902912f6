"""Sizes that the framework itself decides: the model it builds from a config, with every parameter
on the meta device (no memory).

timm writes only the arguments a user overrode into config.json's model_args; the rest (embed_dim,
depth, num_heads of a vit_base_patch16_224) are the registered defaults of the architecture. The way to
read them is the way timm does: build the architecture with model_args, and look."""

from __future__ import annotations

import contextlib

from ..errors import GrowError


@contextlib.contextmanager
def meta_parameters():
    """Build modules with every parameter on the meta device; buffers (RoPE frequencies) stay real. A
    parameter already on meta is kept as it is, so that a module sharing another's (a tied bias) still does."""
    import torch

    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def timm_skeleton(config: dict, where: str = "config.json"):
    """The timm model that config.json describes (its architecture with model_args), parameters on meta."""
    import timm

    args = config.get("model_args") or {}
    if not isinstance(args, dict):
        raise GrowError(f"{where} has model_args that are not an object; timm reads them as keyword arguments.")
    try:
        with meta_parameters():
            return timm.create_model(config["architecture"], pretrained=False, **args).eval()
    except Exception as e:  # timm raises many kinds for arguments it cannot build
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GrowError(f"timm cannot build {config['architecture']} from the model_args in {where}: {reason}") from None


def attribute(model, path: str) -> int | None:
    """The value at a dotted attribute path of the model (a module list counts its members); None
    where the model has no such attribute."""
    import torch

    node = model
    for part in path.split("."):
        if isinstance(node, (torch.nn.ModuleList, torch.nn.Sequential)) and part.isdigit():
            node = node[int(part)] if int(part) < len(node) else None
        else:
            node = getattr(node, part, None)
        if node is None:
            return None
    if isinstance(node, (torch.nn.ModuleList, torch.nn.Sequential)):
        return len(node)
    return node


def built_sizes(spec, config: dict, where: str = "config.json") -> dict[str, int]:
    """Every size that the spec reads from the built model (its `built:` attribute paths)."""
    paths = {name: sk.built for name, sk in spec.sizes.items() if sk.built}
    if not paths:
        return {}
    if spec.framework != "timm":
        raise GrowError(f"spec {spec.file.name} reads sizes from the built model, which grow does for timm only.")
    model = timm_skeleton(config, where)
    return {name: value for name, path in paths.items() if (value := attribute(model, path)) is not None}
