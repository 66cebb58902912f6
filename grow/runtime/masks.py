"""MSG masks: load the masks file of a grown checkpoint, attach it to a transformers or timm model with
forward hooks (the model's code is not touched), step the schedule, detach.

Sites: "input" scales the new entries of a module's input by alpha (new FFN units, new heads);
"norm" recomputes a norm with the new hidden entries weighted by alpha in its statistics and scales
its new outputs by alpha; "block" mixes a new layer as alpha f(h) + (1 - alpha) h."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import GrowError

MASKS_FILE = "msg_masks.json"


def load_masks(path) -> "Masks":
    """The masks of a checkpoint folder (or of a masks file itself)."""
    path = Path(path)
    file = path / MASKS_FILE if path.is_dir() else path
    if not file.is_file():
        raise GrowError(f"{path} has no {MASKS_FILE}; only grow expand --method msg writes one.")
    return Masks(json.loads(file.read_text()))


class Masks:
    def __init__(self, data: dict):
        self.data = data
        self.growths: list[dict] = data["growths"]
        self.norm: str = data["norm"]
        self.norm_offset: float = data.get("norm_offset", 0.0)  # norms that multiply by (offset + w), e.g. Gemma
        self.steps = 0  # optimizer steps taken since the growth
        self._handles: list = []

    # ---- schedule ----------------------------------------------------------------------------
    def alpha(self, growth: int) -> float:
        g = self.growths[growth]
        return min(max((self.steps - g["start_step"]) / g["ramp_steps"], 0.0), 1.0)

    @property
    def alphas(self) -> list[float]:
        return [self.alpha(g) for g in range(len(self.growths))]

    @property
    def done(self) -> bool:
        """True once every alpha is 1: the masks change nothing any more and can be detached."""
        return all(a >= 1.0 for a in self.alphas)

    def step(self) -> None:
        """Call after each optimizer step."""
        self.steps += 1

    # ---- hooks -------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> "Masks":
        if self._handles:
            raise GrowError("these masks are already attached; detach them first.")
        for g, growth in enumerate(self.growths):
            for name in growth["modules"]:
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise GrowError(f"the model has no module {name} that {MASKS_FILE} names; attach the masks to "
                                    "the model loaded from the grown folder.") from None
                self._handles.append(self._hook(module, g, growth))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module: torch.nn.Module, g: int, growth: dict):
        site = growth["site"]
        if site == "input":
            start, stop = growth["new"]

            def scale_input(mod, args):
                a = self.alpha(g)
                if a >= 1.0:
                    return None
                x = args[0]
                mask = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
                mask[start:stop] = a
                return (x * mask, *args[1:])

            return module.register_forward_pre_hook(scale_input)
        if site == "norm":
            start, stop = growth["new"]

            def masked_norm(mod, args, output):
                a = self.alpha(g)
                return output if a >= 1.0 else _masked_norm(mod, args[0], self.norm, start, stop, a, self.norm_offset)

            return module.register_forward_hook(masked_norm)
        if site == "block":

            def mix_block(mod, args, kwargs, output):
                a = self.alpha(g)
                if a >= 1.0:
                    return output
                h = args[0] if args else kwargs["hidden_states"]
                out = output[0] if isinstance(output, tuple) else output
                mixed = a * out + (1.0 - a) * h
                return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

            return module.register_forward_hook(mix_block, with_kwargs=True)
        raise GrowError(f"{MASKS_FILE} names a mask site {site!r} that this grow version does not know.")


def _masked_norm(module, x: torch.Tensor, kind: str, start: int, stop: int, alpha: float,
                 offset: float = 0.0) -> torch.Tensor:
    """The norm with entries [start, stop) counted with weight alpha in its statistics, and its outputs
    there scaled by alpha: at alpha = 0 the old entries are normalized exactly as in the source."""
    dtype = x.dtype
    xf = x.float()
    m = torch.ones(xf.shape[-1], device=x.device)
    m[start:stop] = alpha
    n = m.sum()
    eps = getattr(module, "variance_epsilon", None)
    eps = module.eps if eps is None else eps
    if kind == "rms":
        y = xf * torch.rsqrt((m * xf.pow(2)).sum(-1, keepdim=True) / n + eps)
        out = (module.weight + offset) * y.to(dtype)
    else:
        mean = (m * xf).sum(-1, keepdim=True) / n
        centred = xf - mean
        y = centred * torch.rsqrt((m * centred.pow(2)).sum(-1, keepdim=True) / n + eps)
        out = y.to(dtype) * (module.weight + offset)
        if module.bias is not None:
            out = out + module.bias
    return out * m.to(out.dtype)
