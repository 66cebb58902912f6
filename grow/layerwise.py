"""Run a checkpoint in its own framework (transformers or timm) without ever holding the whole model.

The model is built with every parameter on the meta device (no memory), and each module's tensors are
read from the checkpoint just before that module runs and dropped right after it, so memory is bounded
by one module's weights plus the activations. Calibration and verification both run models this way."""

from __future__ import annotations

import warnings
import zlib

import torch

from .arch.built import meta_parameters, timm_skeleton
from .arch.view import ModelView
from .errors import GrowError, UsageError


def skeleton(view: ModelView):
    """The source's model class with meta parameters, and a function running its trunk (no head)."""
    if view.spec.framework == "timm":
        model = timm_skeleton(view.config, str(view.source.path / "config.json"))
        return model, model.forward_features
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.from_pretrained(str(view.source.path))
    auto = getattr(transformers, view.spec.model_entry(view.architecture)["auto_class"])
    with meta_parameters(), warnings.catch_warnings():
        # an empty module (Qwen2-MoE's shared expert when upcycling gave it no units) is initialised as a no-op
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        model = auto.from_config(config, dtype=torch.float32)
    trunk = model.eval().base_model
    return model, lambda ids: trunk(input_ids=ids, use_cache=False).last_hidden_state


CHUNK_BYTES = 1 << 28  # a Linear or Embedding weight larger than this is never held whole: read in row blocks
CHUNK_ROWS_MIN = 256


def resolve_device(device) -> torch.device:
    """cpu or cuda; cuda is refused with one sentence where torch cannot use a GPU."""
    name = str(device or "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"--device {name} is not a device grow runs on; choose cpu or cuda.")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} needs a CUDA GPU that torch can use, and there is none here; use --device cpu.")
    return torch.device(name)


class Loader:
    """Forward hooks that give a module its real tensors for the duration of its own forward.

    `weights` gives the tensors (the view's Source by default); `init(module)` instead initialises each
    module afresh, seeded by its name, so that a random model of any size runs in bounded memory too.
    Linear and Embedding weights larger than CHUNK_BYTES are never whole in memory: a Linear runs in
    blocks of output rows, an Embedding reads only the rows its input ids pick."""

    def __init__(self, model: torch.nn.Module, view: ModelView, *, weights=None, init=None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        self.source = weights if weights is not None else view.source
        self.spec = view.spec
        self.init, self.seed = init, seed
        self.dtype, self.device = dtype, torch.device(device)
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.aliases = _tie_aliases(model, view)
        self.stored_as = _stored_as(model, view) if init is None else {}
        self.live = 0
        self.peak = 0
        self.charged: dict[int, int] = {}  # bytes each loaded module holds
        self.handles = []
        if self.device.type != "cpu":
            for module in model.modules():
                for bname, b in module._buffers.items():
                    if b is not None:
                        module._buffers[bname] = b.to(self.device)
        for name, module in model.named_modules():
            if not any(p is not None for p in module._parameters.values()):
                continue
            if module is model:  # root parameters (class token, positions) are used outside any forward
                self._load(module, name)
                continue
            weight = module._parameters.get("weight")
            big = weight is not None and weight.numel() * self.itemsize > CHUNK_BYTES
            if big and type(module).forward is torch.nn.Linear.forward:
                module.forward = self._chunked_linear(module, name)
                continue
            if big and isinstance(module, torch.nn.Embedding):
                self.handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._load_rows(m, n, a[0])))
            else:
                self.handles.append(module.register_forward_pre_hook(lambda m, _a, n=name: self._load(m, n)))
            self.handles.append(module.register_forward_hook(lambda m, _a, _o: self._drop(m)))

    def _name(self, module: torch.nn.Module, prefix: str, pname: str) -> str:
        path = f"{prefix}.{pname}" if prefix else pname
        if self.init is None and self.spec.tensor_name(path) not in self.source.tensors and path in self.aliases:
            path = self.aliases[path]
        full = self.spec.tensor_name(path)
        if self.init is None and full not in self.source.tensors:
            raise GrowError(f"the checkpoint has no tensor {full}, which the {type(module).__name__} module needs.")
        return full

    def _seeded(self, *key) -> torch.Generator:
        return torch.Generator().manual_seed(zlib.crc32(repr((self.seed, *key)).encode()))

    def _fresh(self, module: torch.nn.Module, prefix: str, *key) -> dict[str, torch.Tensor]:
        """A module's parameters freshly initialised, the same on every call."""
        for pname, p in module._parameters.items():
            if p is not None:
                module._parameters[pname] = torch.nn.Parameter(torch.zeros(p.shape), requires_grad=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seeded(prefix, *key).initial_seed())
            self.init(module)
        return {k: p.data for k, p in module._parameters.items() if p is not None}

    def _set(self, module: torch.nn.Module, pname: str, t: torch.Tensor) -> None:
        t = t.to(device=self.device, dtype=self.dtype)
        module._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
        self._charge(module, t.numel() * t.element_size())

    def _charge(self, module: torch.nn.Module, nbytes: int) -> None:
        self.charged[id(module)] = self.charged.get(id(module), 0) + nbytes
        self.live += nbytes

    def _load(self, module: torch.nn.Module, prefix: str) -> None:
        if self.init is not None:
            for pname, t in self._fresh(module, prefix).items():
                self._set(module, pname, t)
        else:
            for pname, p in module._parameters.items():
                if p is None:
                    continue
                build = self.stored_as.get(f"{prefix}.{pname}")
                self._set(module, pname, build(self.source.get) if build else self.source.get(self._name(module, prefix, pname)))
        self.peak = max(self.peak, self.live)

    def _rows(self, module: torch.nn.Module, prefix: str, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows [start, stop) of a big Linear's or Embedding's weight (and bias)."""
        if self.init is not None:
            if isinstance(module, torch.nn.Embedding):
                proto = torch.nn.Embedding(stop - start, module.embedding_dim, device="meta")
            else:
                proto = torch.nn.Linear(module.in_features, stop - start, bias=module.bias is not None, device="meta")
            return self._fresh(proto, prefix, start)
        return {pname: self.source.get_rows(self._name(module, prefix, pname), start, stop)
                for pname, p in module._parameters.items() if p is not None}

    def _row_blocks(self, module: torch.nn.Module):
        rows = module.weight.shape[0]
        step = max(CHUNK_ROWS_MIN, CHUNK_BYTES // 4 // max(1, module.weight[0].numel() * self.itemsize))
        return [(a, min(a + step, rows)) for a in range(0, rows, step)]

    def _chunked_linear(self, module: torch.nn.Linear, prefix: str):
        def forward(x: torch.Tensor) -> torch.Tensor:
            outs = []
            for a, b in self._row_blocks(module):
                part = {k: t.to(device=self.device, dtype=self.dtype) for k, t in self._rows(module, prefix, a, b).items()}
                self.peak = max(self.peak, self.live + sum(t.numel() * t.element_size() for t in part.values()))
                outs.append(torch.nn.functional.linear(x, part["weight"], part.get("bias")))
            return torch.cat(outs, -1)

        return forward

    def _load_rows(self, module: torch.nn.Embedding, prefix: str, ids: torch.Tensor) -> None:
        """The weight as an untouched allocation (no memory until written) with only the rows in use filled."""
        weight = torch.empty(module.weight.shape, dtype=self.dtype, device=self.device)
        wanted = set(ids.unique().tolist())
        for a, b in self._row_blocks(module):
            needed = [i for i in wanted if a <= i < b]
            if self.init is not None and needed:  # a random block is drawn whole, so it is the same on every call
                weight[a:b] = self._rows(module, prefix, a, b)["weight"].to(self.dtype)
                continue
            for i in needed:
                weight[i] = self.source.get_rows(self._name(module, prefix, "weight"), i, i + 1)[0].to(self.dtype)
        module._parameters["weight"] = torch.nn.Parameter(weight, requires_grad=False)
        self._charge(module, len(wanted) * weight[0].numel() * weight.element_size())
        self.peak = max(self.peak, self.live)

    def _drop(self, module: torch.nn.Module) -> None:
        for pname, p in module._parameters.items():
            if p is not None and p.device.type != "meta":
                module._parameters[pname] = torch.nn.Parameter(p.to("meta"), requires_grad=False)
        self.live -= self.charged.pop(id(module), 0)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _tie_aliases(model: torch.nn.Module, view: ModelView) -> dict[str, str]:
    """A tied parameter -> the name the checkpoint stores it under. Parameters that are one tensor in the
    model (transformers 4 ties BERT's decoder bias to `cls.predictions.bias` so) are aliases of whichever
    of their names the checkpoint has; a tied head is also an alias of the embedding where the config ties
    them, as the model class declares (transformers 5: a mapping; 4: a list of head parameters)."""
    stored = view.source.tensors
    aliases: dict[str, str] = {}
    if view.tied:
        keys = getattr(model, "_tied_weights_keys", None) or {}
        if not isinstance(keys, dict):
            embedding = view.spec.module_path(view.spec.by_role("embedding")[0].name())
            keys = {k: embedding for k in keys}
        aliases.update(keys)
    same: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        same.setdefault(id(p), []).append(name)
    for names in same.values():
        held = [n for n in names if view.spec.tensor_name(n) in stored]
        aliases.update({n: held[0] for n in names if held and n not in held})
    return aliases


def _stored_as(model: torch.nn.Module, view: ModelView) -> dict:
    """Parameters the framework holds under another name or layout than the checkpoint's, each with how
    to build it from the checkpoint's tensors (given a function reading one): renamed ones (the spec's
    `renamed`) and a layer's experts stacked into two parameters (`fused_experts`, transformers 5)."""
    spec, stored = view.spec, view.source.tensors
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    layers = range(view.sizes.get("layers", 0))  # a staged model (ConvNeXt) has neither renames nor experts
    out = {}
    for path_pattern, name_pattern in spec.model.renamed.items():
        for i in layers if "{i}" in path_pattern else [None]:
            path, name = spec.module_path(path_pattern.format(i=i)), name_pattern.format(i=i)
            if path in params and spec.tensor_name(path) not in stored and name in stored:
                out[path] = lambda get, name=name: get(name)
    fused = spec.model.fused_experts
    for i in layers if fused is not None else []:
        parts = {part: [pattern.format(i=i, e=e) for e in range(view.sizes["experts"])]
                 for part, pattern in fused.experts.model_dump().items()}
        if not all(n in stored for names in parts.values() for n in names):
            continue  # a dense layer
        gate_up, down = spec.module_path(fused.gate_up.format(i=i)), spec.module_path(fused.down.format(i=i))
        if gate_up in params:  # [experts, gate rows then up rows, hidden]
            out[gate_up] = lambda get, p=parts: torch.stack([torch.cat([get(g), get(u)]) for g, u in zip(p["gate"], p["up"])])
        if down in params:
            out[down] = lambda get, p=parts: torch.stack([get(d) for d in p["down"]])
    return out


def _unmapped(model: torch.nn.Module, view: ModelView) -> list[str]:
    """Parameters of the skeleton that no checkpoint tensor (tied alias, renamed or fused tensor) provides."""
    aliases, built = _tie_aliases(model, view), _stored_as(model, view)
    names = view.source.tensors
    return [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in built
            and view.spec.tensor_name(n) not in names and view.spec.tensor_name(aliases.get(n, n)) not in names]


class _Whole:
    """The loader's place for a model loaded whole: every parameter is in memory all the time."""

    def __init__(self, model: torch.nn.Module):
        self.peak = sum(p.numel() * p.element_size() for p in model.parameters())

    def remove(self) -> None:
        pass


def _reset(module: torch.nn.Module) -> None:
    """PyTorch's own initialisation where a module has one; small normal values for bare parameters."""
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    else:
        for p in module._parameters.values():
            if p is not None:
                torch.nn.init.normal_(p, std=0.02)


class Runner:
    """A model run layer by layer: its outputs, its hidden state at every layer boundary, its loss.

    random=True runs a freshly initialised model of the view's shape instead of the checkpoint's
    tensors; `prepare(model)` sees the skeleton before the loader does (to attach MSG masks, whose
    hooks then run while the module's tensors are loaded). Where the framework's modules hold
    tensors under other names than the checkpoint's (transformers 5 fuses Mixtral-style experts into
    one tensor when it loads), `whole()` gives the model loaded whole instead (`layer_by_layer` False)."""

    def __init__(self, view: ModelView, *, random: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device="cpu", prepare=None, on_layer=None, whole=None):
        self.view = view
        self.framework = view.spec.framework
        self.model, self.trunk = skeleton(view)
        self.dtype, self.device = dtype, torch.device(device)
        self.layer_by_layer = random or whole is None or not _unmapped(self.model, view)
        if not self.layer_by_layer:
            self.model = whole().to(device=self.device, dtype=dtype)
        if prepare is not None:
            prepare(self.model)
        init = None
        if random:
            init = _reset if self.framework == "timm" else self.model._init_weights
        self.loader = (Loader(self.model, view, init=init, seed=seed, dtype=dtype, device=device) if self.layer_by_layer
                       else _Whole(self.model))
        self.layers = [self.model.get_submodule(path) for path in view.layer_modules]
        self.entry = view.spec.model_entry(view.architecture) if self.framework == "transformers" else {}
        self.head = self._head()
        self.on_layer = on_layer

    def _head(self):
        """What maps a layer boundary's hidden state to the model's output (the logit lens): nothing for a
        bare encoder (its output is the hidden state), the head module a spec names, else the final norm
        and then the classifier or the output embeddings."""
        if self.entry.get("output_axis"):
            return lambda h: h
        if self.entry.get("head"):
            return self.model.get_submodule(self.entry["head"])
        norms = self.view.spec.by_role("final_norm")
        norm = (self.model.get_submodule(self.view.spec.module_path(norms[0].pattern.rsplit(".", 1)[0]))
                if norms else torch.nn.Identity())
        if self.framework == "timm":
            return lambda h: self.model.forward_head(norm(h))
        return lambda h: self.model.get_output_embeddings()(norm(h))

    def _call(self, x: torch.Tensor, **kwargs):
        """The model's output object; a causal LM is told to keep no cache (an encoder takes no such argument)."""
        if self.entry.get("objective") == "causal_lm":
            kwargs["use_cache"] = False
        return self.model(input_ids=x, **kwargs)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        return x.to(self.dtype) if x.is_floating_point() else x

    def forward(self, inputs: torch.Tensor, keep: slice | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs (logits) in float32 on the CPU, and the hidden state at each layer boundary (the
        embeddings, then after every layer) at the sequence positions `keep`."""
        states: list[torch.Tensor] = []

        def save(x):
            x = _first(x)
            states.append((x if keep is None else x[:, keep]).float().cpu())

        hooks = [self.layers[0].register_forward_pre_hook(
            lambda _m, a, k: save(a[0] if a else k["hidden_states"]), with_kwargs=True)]
        def after_layer(_m, _a, o):
            save(o)
            if self.on_layer is not None:
                self.on_layer()

        hooks += [layer.register_forward_hook(after_layer) for layer in self.layers]
        try:
            with torch.no_grad():
                x = self._inputs(inputs)
                out = self.model(x) if self.framework == "timm" else getattr(self._call(x), self.entry["output"])
        finally:
            for h in hooks:
                h.remove()
        return out.float().cpu(), states

    def lens(self, states: list[torch.Tensor], group: int = 8) -> list[torch.Tensor]:
        """Each boundary's hidden state read out through the final norm and the head (the logit lens),
        a few boundaries at a time so the head is read a few times, not once per layer."""
        out = []
        with torch.no_grad():
            for a in range(0, len(states), group):
                y = self.head(self._inputs(torch.cat(states[a:a + group], 0)))
                out.extend(y.float().cpu().split(states[0].shape[0], 0))
        return out

    def loss(self, ids: torch.Tensor, labels: torch.Tensor) -> float:
        """The head's own loss (next token, or the masked tokens of a masked LM) on `ids`."""
        with torch.no_grad():
            return self._call(self._inputs(ids), labels=labels.to(self.device)).loss.item()

    def close(self) -> None:
        self.loader.remove()
