"""Layer-by-layer activation statistics: how much each residual dim, FFN unit and head is used.

The source runs in its own framework (transformers or timm) so that RoPE, masks and attention are
exactly the real ones, but never as a whole model: grow.layerwise loads each module's tensors just
before it runs. The calibration batch goes through in one forward pass, so each tensor is read once;
memory is bounded by one module's weights plus the activations."""

from __future__ import annotations

import json
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arch.view import ModelView
from .errors import GrowError, GrowWarning, UsageError
from .layerwise import Loader, Runner, _first, resolve_device, skeleton

DEFAULT_TOKENS = 8192
MAX_SEQ_LEN = 512
# Held out from the default calibration text: verify measures its sample-text loss on textwrap.py.
HELD_OUT = ("textwrap.py",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class Importance:
    """Mean |activation| per unit: `hidden` over every layer boundary of the residual stream,
    `units[(layer, space)]` at the input of the Linear that reads that space (FFN units, q = heads x head_dim)."""

    hidden: torch.Tensor
    units: dict[tuple[int, str], torch.Tensor]
    tokens: int
    inputs: str  # what the statistics were computed on
    peak_param_bytes: int = 0  # most parameter bytes that were in memory at once
    notes: list[str] = field(default_factory=list)
    # per layer, the mean of 1 - cos(block input, block output) over tokens (ShortGPT's block influence)
    influence: torch.Tensor | None = None
    # [hidden, hidden] float64: the mean of x x^T / mean(x^2) over the inputs of every residual norm, i.e. the
    # second moment of the residual stream as the norms see it (scale removed); its eigenvectors are the
    # residual directions that carry the most of what the readers read
    covariance: torch.Tensor | None = None
    # per layer, the KL divergence of the output from the source's when that layer alone is skipped
    # (measured only when asked: it runs the model once more per layer)
    skip_loss: torch.Tensor | None = None
    # per (layer, space) as `units`: the L2 norm of each unit's fan-in column in the Linear that reads it,
    # the weights through which the unit writes; mean |activation| x this norm is what it adds to the output
    unit_norms: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def unit_scores(self, layer: int, space: str, ranking: str = "activation") -> torch.Tensor:
        """Per unit: mean |activation| ("activation"), or that times the unit's fan-in column norm
        ("contribution": the mean size of what the unit writes)."""
        scores = self.units[(layer, space)]
        return scores * self.unit_norms[(layer, space)] if ranking == "contribution" else scores

    def head_scores(self, layer: int, head_dim: int, ranking: str = "activation") -> torch.Tensor:
        return self.unit_scores(layer, "q", ranking).view(-1, head_dim).mean(1)


class _Stats:
    def __init__(self):
        self.sum: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).abs().to(torch.float64)
        s = flat.sum(0).cpu()
        self.sum = s if self.sum is None else self.sum + s
        self.count += flat.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).to(torch.float32)


def _unit_reader_entries(view: ModelView) -> dict:
    """(layer, space) -> the weight entry of the Linear whose input is that space (FFN units or heads)."""
    out = {}
    for e in view.entries:
        spec = e.spec
        if e.layer is None or spec.reads is None or not e.name.endswith(".weight"):
            continue
        spaces = spec.axes[spec.reads]
        if len(spaces) == 1 and spaces[0] in ("ffn", "q"):
            out[(e.layer, spaces[0])] = e
    return out


def _unit_readers(view: ModelView) -> dict[tuple[int, str], str]:
    """(layer, space) -> module whose input is that space: the Linears reading FFN units or heads."""
    return {k: view.spec.module_path(e.name.removesuffix(".weight")) for k, e in _unit_reader_entries(view).items()}


NORM_BLOCK_BYTES = 1 << 26


def _unit_norms(view: ModelView, keys) -> dict[tuple[int, str], torch.Tensor]:
    """Per unit of the (layer, space) `keys`, the L2 norm of its fan-in column in the Linear that reads
    it, read from the checkpoint in row blocks."""
    out = {}
    for key, e in _unit_reader_entries(view).items():
        if key not in keys:
            continue
        info = view.source.tensors[e.name]
        rows = info.shape[0]
        step = max(1, NORM_BLOCK_BYTES // max(1, info.nbytes // max(rows, 1)))
        squares = []
        for a in range(0, rows, step):
            block = view.source.get_rows(e.name, a, min(rows, a + step)).to(torch.float64).pow(2)
            squares.append(block.sum(0) if e.spec.reads == 1 else block.sum(1))
        total = torch.stack(squares).sum(0) if e.spec.reads == 1 else torch.cat(squares)
        out[key] = total.sqrt().to(torch.float32)
    return out


def collect(view: ModelView, inputs: torch.Tensor, description: str, notes: list[str] | None = None,
            progress=None, device="cpu") -> Importance:
    """Run `inputs` (token ids or images) through the source one module at a time and gather the
    statistics; progress("calibrating", layers done, layers) after each layer."""
    device = resolve_device(device)
    model, trunk = skeleton(view)
    loader = Loader(model, view, device=device)
    hidden = _Stats()
    units = {key: _Stats() for key in _unit_readers(view)}
    hooks = []
    layers = view.sizes["layers"]

    hooks.append(model.get_submodule(view.spec.layer_module(0)).register_forward_pre_hook(
        lambda _m, a, k: hidden.add(_hidden_states(a, k)), with_kwargs=True))

    def on_output(i, output):
        hidden.add(_first(output))
        if progress:
            progress("calibrating", i + 1, layers)

    for i in range(layers):
        hooks.append(model.get_submodule(view.spec.layer_module(i)).register_forward_hook(
            lambda _m, _a, o, i=i: on_output(i, o)))
    norms = {}
    readers = _unit_reader_entries(view)

    def on_reader(module, args, key):
        units[key].add(args[0])
        weight = module.weight
        if key not in norms and weight.device.type != "meta":  # loaded for this forward: no second read
            norms[key] = weight.detach().double().pow(2).sum(1 - readers[key].spec.reads).sqrt().float().cpu()

    for key, name in _unit_readers(view).items():
        hooks.append(model.get_submodule(name).register_forward_pre_hook(lambda m, a, k=key: on_reader(m, a, k)))
    influence, covariance = _Influence(layers), _Covariance(view.sizes["hidden"])
    hooks += influence.attach(model, view) + covariance.attach(model, view)
    if progress:
        progress("calibrating", 0, layers)
    try:
        with torch.no_grad():
            trunk(inputs.to(device))
    finally:
        for h in hooks:
            h.remove()
        loader.remove()
    tokens = int(inputs.numel()) if inputs.dtype == torch.long else hidden.count // (layers + 1)
    return Importance(hidden.mean(), {k: s.mean() for k, s in units.items()}, tokens, description,
                      loader.peak, list(notes or []), influence.mean(), covariance.mean(),
                      # a Linear run in row blocks (never whole) has its norms read from the checkpoint
                      unit_norms={**norms, **_unit_norms(view, set(units) - set(norms))})


def _hidden_states(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _Influence:
    """Block influence per layer (ShortGPT): 1 - cos(input, output) averaged over tokens. A block whose
    output points where its input did changes the residual least, and costs least to remove."""

    def __init__(self, layers: int):
        self.sum = torch.zeros(layers, dtype=torch.float64)
        self.count = torch.zeros(layers, dtype=torch.float64)
        self.inputs: dict[int, torch.Tensor] = {}

    def attach(self, model, view: ModelView) -> list:
        hooks = []
        for i in range(len(self.sum)):
            block = model.get_submodule(view.spec.layer_module(i))
            hooks.append(block.register_forward_pre_hook(
                lambda _m, a, k, i=i: self.inputs.__setitem__(i, _hidden_states(a, k)), with_kwargs=True))
            hooks.append(block.register_forward_hook(lambda _m, _a, o, i=i: self._add(i, _first(o))))
        return hooks

    def _add(self, layer: int, output: torch.Tensor) -> None:
        x = self.inputs.pop(layer).reshape(-1, output.shape[-1]).to(torch.float64)
        y = output.detach().reshape(-1, output.shape[-1]).to(torch.float64)
        self.sum[layer] += (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum()
        self.count[layer] += x.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / self.count.clamp(min=1)).to(torch.float32)


def _residual_norms(view: ModelView) -> list[str]:
    """Module paths of the norms that read the residual stream (every block's norms and the final one)."""
    return [view.spec.module_path(e.name.removesuffix(".weight")) for e in view.entries
            if e.spec.role in ("norm", "final_norm") and e.name.endswith(".weight") and e.spec.axes == (("hidden",),)]


class _Covariance:
    """Sum of x x^T / mean(x^2) over every residual norm's inputs, in float64, one norm at a time:
    memory is one [hidden, hidden] matrix whatever the depth."""

    def __init__(self, hidden: int):
        self.sum = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.count = 0

    def attach(self, model, view: ModelView) -> list:
        return [model.get_submodule(name).register_forward_pre_hook(lambda _m, a: self._add(a[0]))
                for name in _residual_norms(view)]

    def _add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        flat = flat / flat.pow(2).mean(-1, keepdim=True).clamp(min=1e-30).sqrt()
        self.sum += flat.T @ flat
        self.count += flat.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


SKIP_OUTPUT_BYTES = 1 << 27  # the outputs of one pass over a chunk of the calibration batch


def skip_losses(view: ModelView, inputs: torch.Tensor, progress=None, device="cpu") -> torch.Tensor:
    """Per layer, the mean KL divergence (nats per token or image) of the model's output distribution
    from the source's when that one layer is skipped (its output replaced by its input). The model
    runs module by module as in calibration, once for the reference and once per layer, over chunks
    of the batch small enough that two outputs stay within SKIP_OUTPUT_BYTES: bounded memory,
    (layers + 1) passes of compute. progress("layer losses", passes done, passes)."""
    if not outputs_distribution(view):
        raise UsageError(f"--layer-removal loss needs an output head, and a {view.architecture} checkpoint has none; "
                         "use --layer-removal influence.")
    runner = Runner(view, device=resolve_device(device))
    nothing = slice(0, 0)  # no hidden states kept
    total = torch.zeros(len(runner.layers), dtype=torch.float64)
    count = 0
    try:
        first = runner.forward(inputs[:1], keep=nothing)[0]
        per_chunk = max(1, SKIP_OUTPUT_BYTES // (2 * first.numel() * 4))
        chunks = inputs.split(per_chunk)
        passes = len(chunks) * (len(runner.layers) + 1)
        for c, chunk in enumerate(chunks):
            ref = torch.log_softmax(runner.forward(chunk, keep=nothing)[0].double(), -1)
            for i, layer in enumerate(runner.layers):
                hook = layer.register_forward_hook(_pass_input_through, with_kwargs=True)
                try:
                    out = torch.log_softmax(runner.forward(chunk, keep=nothing)[0].double(), -1)
                finally:
                    hook.remove()
                total[i] += (ref.exp() * (ref - out)).sum()
                if progress:
                    progress("layer losses", c * (len(runner.layers) + 1) + i + 2, passes)
            count += ref[..., 0].numel()
    finally:
        runner.close()
    return (total / max(count, 1)).to(torch.float32)


def outputs_distribution(view: ModelView) -> bool:
    """Whether the model's output is logits (a language-model head or a classifier), not hidden states."""
    return view.spec.framework == "timm" or view.spec.model_entry(view.architecture).get("output", "logits") == "logits"


def _pass_input_through(_module, args, kwargs, output):
    """A forward hook that makes a block the identity: its output is its input."""
    x = _hidden_states(args, kwargs)
    return (x, *output[1:]) if isinstance(output, (tuple, list)) else x


# ---- calibration inputs ------------------------------------------------------------------------

def _text_files(calibration) -> list[Path]:
    if calibration is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        return [p for p in sorted(stdlib.glob("*.py")) if p.name not in HELD_OUT]
    path = Path(calibration).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file()]
        if files:
            return files
    raise UsageError(f"--calibration {calibration} is not a file or a folder with files in it.")


def _seq_len(view: ModelView, config_max: int | None) -> int:
    limit = view.sizes.get("positions") or config_max or MAX_SEQ_LEN
    return max(2, min(MAX_SEQ_LEN, int(limit) - view.spec.reserved_positions))


def token_batch(view: ModelView, calibration=None, tokens: int = DEFAULT_TOKENS, seed: int = 0) -> tuple[torch.Tensor, str, list[str]]:
    """Calibration token ids [batch, seq] from text through the source's own tokenizer."""
    vocab = view.sizes["vocab"]
    seq = _seq_len(view, view.config.get("max_position_embeddings"))
    if tokens < seq:
        raise UsageError(f"--calibration-tokens must be at least one sequence of {seq} tokens, not {tokens}.")
    tok = None
    # transformers builds an empty tokenizer for a folder without one, so look for the files first
    if any((view.source.path / f).is_file() for f in TOKENIZER_FILES):
        try:
            import transformers

            tok = transformers.AutoTokenizer.from_pretrained(str(view.source.path))
        except Exception:
            tok = None
    if tok is None:
        if calibration is not None:
            raise UsageError(f"--calibration needs the source's tokenizer, and {view.source.path} has none.")
        note = "the source has no tokenizer: importance was computed on random tokens, which says little about real use."
        warnings.warn(note, GrowWarning, stacklevel=2)
        gen = torch.Generator().manual_seed(seed)
        n = tokens // seq
        return torch.randint(0, vocab, (n, seq), generator=gen), f"{n * seq} random tokens", [note]
    ids: list[int] = []
    for f in _text_files(calibration):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= tokens:
            break
    n = min(tokens, len(ids)) // seq
    if n == 0:
        raise UsageError(f"--calibration {calibration} holds fewer than {seq} tokens of text; give more text.")
    batch = torch.tensor(ids[: n * seq]).view(n, seq)
    if int(batch.max()) >= vocab:
        raise GrowError(f"the tokenizer in {view.source.path} yields ids beyond the model's vocabulary of {vocab}.")
    where = "the Python standard library" if calibration is None else str(calibration)
    if view.spec.model_entry(view.architecture)["objective"] == "masked_lm" and tok.mask_token_id is not None:
        batch, _ = masked_lm_inputs(batch, tok.mask_token_id)  # what a masked LM saw in pretraining
        where += ", every 7th token masked"
    return batch, f"{n * seq} tokens of {where}", []


def masked_lm_inputs(ids: torch.Tensor, mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with every 7th token (about the 15% masked-LM pretraining hides) replaced by the mask
    token, and the labels a masked-LM loss takes (-100 where nothing is masked)."""
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[:, 1::7] = True
    return torch.where(masked, mask_token_id, ids), torch.where(masked, ids, -100)


def image_batch(view: ModelView, calibration=None, tokens: int = DEFAULT_TOKENS, seed: int = 0) -> tuple[torch.Tensor, str, list[str]]:
    """Calibration images [n, 3, H, W], normalised as the model expects; random images only without a folder."""
    pcfg = view.config.get("pretrained_cfg", {})
    size = pcfg.get("input_size") or [3, 224, 224]
    patch = view.config.get("model_args", {}).get("patch_size", 16)
    per_image = (size[1] // patch) * (size[2] // patch) + 1
    n = max(1, tokens // per_image)
    if calibration is None:
        note = "no --calibration images: importance was computed on random images, which says little about real use."
        warnings.warn(note, GrowWarning, stacklevel=2)
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((n, *size), generator=gen), f"{n} random images", [note]
    from PIL import Image

    path = Path(calibration).expanduser()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"--calibration {calibration} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    mean = torch.tensor(pcfg.get("mean", [0.5, 0.5, 0.5])).view(3, 1, 1)
    std = torch.tensor(pcfg.get("std", [0.5, 0.5, 0.5])).view(3, 1, 1)
    images = []
    for f in files[:n]:
        img = Image.open(f).convert("RGB").resize((size[2], size[1]), Image.BICUBIC)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size[1], size[2], 3)
        images.append((x.permute(2, 0, 1).float() / 255 - mean) / std)
    return torch.stack(images), f"{len(images)} images from {calibration}", []


def calibration_inputs(view: ModelView, calibration=None, tokens: int = DEFAULT_TOKENS, seed: int = 0):
    """(inputs, description, notes): token ids for language models, images for timm."""
    make = image_batch if view.spec.framework == "timm" else token_batch
    return make(view, calibration, tokens, seed)


# ---- score files ------------------------------------------------------------------------------

def save(path: Path, imp: Importance, view: ModelView) -> None:
    from safetensors.torch import save_file

    tensors = {"hidden": imp.hidden.contiguous(), "influence": imp.influence.contiguous(),
               "covariance": imp.covariance.contiguous()}
    if imp.skip_loss is not None:
        tensors["skip_loss"] = imp.skip_loss.contiguous()
    tensors.update({f"layers.{i}.{space}": t.contiguous() for (i, space), t in imp.units.items()})
    tensors.update({f"layers.{i}.{space}.norm": t.contiguous() for (i, space), t in imp.unit_norms.items()})
    meta = {"source": view.source.id, "tokens": str(imp.tokens), "inputs": imp.inputs, "notes": json.dumps(imp.notes)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load(path: Path, view: ModelView) -> Importance:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UsageError(f"--scores {path} is not a scores file grow wrote ({e.__class__.__name__}); delete it or give another path.") from None
    d = view.sizes["hidden"]
    expected = {"hidden": (d,), "influence": (view.sizes["layers"],), "covariance": (d, d)}
    for i, s in _unit_readers(view):
        expected[f"layers.{i}.{s}"] = expected[f"layers.{i}.{s}.norm"] = (view.spec.space_size(s, view.sizes),)
    if "skip_loss" in tensors:  # measured only where layers were removed by loss
        expected["skip_loss"] = (view.sizes["layers"],)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    if shapes != expected:
        raise UsageError(f"--scores {path} was computed for a model of another shape than {view.source.id}, "
                         "or by an older grow; delete it or give another path.")
    units, norms = {}, {}
    for k, t in tensors.items():
        if k.startswith("layers."):
            _, i, space, *norm = k.split(".")
            (norms if norm else units)[(int(i), space)] = t
    return Importance(tensors["hidden"], units, int(meta.get("tokens", 0)), meta.get("inputs", "?"),
                      notes=json.loads(meta.get("notes", "[]")), influence=tensors["influence"],
                      covariance=tensors["covariance"], skip_loss=tensors.get("skip_loss"), unit_norms=norms)


def importance(view: ModelView, *, calibration=None, tokens: int = DEFAULT_TOKENS, scores=None, seed: int = 0,
               progress=None, device="cpu", layer_loss: bool = False) -> Importance:
    """Scores from `scores` when that file exists, else computed on the calibration data (and saved there);
    layer_loss also measures each layer's skip loss (added to the file when it lacks them)."""
    path = Path(scores).expanduser() if scores is not None else None
    imp = load(path, view) if path is not None and path.is_file() else None
    if imp is not None and (imp.skip_loss is not None or not layer_loss):
        return imp
    inputs, description, notes = calibration_inputs(view, calibration, tokens, seed)
    if imp is None:
        imp = collect(view, inputs, description, notes, progress, device)
    if layer_loss:
        imp.skip_loss = skip_losses(view, inputs, progress, device)
    if path is not None:
        save(path, imp, view)
    return imp
