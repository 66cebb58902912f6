"""Run a checkpoint in its own framework (transformers or timm) without ever holding the whole model.

The model is built with every parameter on the meta device (no memory), and each module's tensors are
read from the checkpoint just before that module runs and dropped right after it, so memory is bounded
by one module's weights plus the activations. Calibration and verification both run models this way."""

from __future__ import annotations

import torch

from .arch.built import meta_parameters, timm_skeleton
from .arch.view import ModelView
from .errors import GrowError


def skeleton(view: ModelView):
    """The source's model class with meta parameters, and a function running its trunk (no head)."""
    if view.spec.framework == "timm":
        model = timm_skeleton(view.config, str(view.source.path / "config.json"))
        return model, model.forward_features
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.from_pretrained(str(view.source.path))
    auto = getattr(transformers, view.spec.model_entry(view.architecture)["auto_class"])
    with meta_parameters():
        model = auto.from_config(config, dtype=torch.float32)
    trunk = model.eval().base_model
    return model, lambda ids: trunk(input_ids=ids, use_cache=False).last_hidden_state


class Loader:
    """Forward hooks that give a module its real tensors for the duration of its own forward."""

    def __init__(self, model: torch.nn.Module, view: ModelView):
        self.source = view.source
        self.spec = view.spec
        self.live = 0
        self.peak = 0
        self.handles = []
        for name, module in model.named_modules():
            if not any(p is not None for p in module._parameters.values()):
                continue
            if module is model:  # root parameters (class token, positions) are used outside any forward
                self._load(module, name)
                continue
            self.handles.append(module.register_forward_pre_hook(lambda m, _a, n=name: self._load(m, n)))
            self.handles.append(module.register_forward_hook(lambda m, _a, _o: self._drop(m)))

    def _load(self, module: torch.nn.Module, prefix: str) -> None:
        for pname, p in module._parameters.items():
            if p is None:
                continue
            full = self.spec.tensor_name(f"{prefix}.{pname}" if prefix else pname)
            if full not in self.source.tensors:
                raise GrowError(f"the checkpoint has no tensor {full}, which the {type(module).__name__} module needs.")
            t = self.source.get(full).to(torch.float32)
            module._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
            self.live += t.numel() * 4
        self.peak = max(self.peak, self.live)

    def _drop(self, module: torch.nn.Module) -> None:
        for pname, p in module._parameters.items():
            if p is not None and p.device.type != "meta":
                self.live -= p.numel() * 4
                module._parameters[pname] = torch.nn.Parameter(p.to("meta"), requires_grad=False)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
