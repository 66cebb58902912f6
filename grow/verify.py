"""Load source and target in the framework users use, run both on seeded inputs, and compare."""

from __future__ import annotations

import json
import sysconfig
import warnings
from pathlib import Path
from typing import Callable

import torch

from . import DEFAULT_TOL
from .arch.spec import architecture_name, spec_for
from .calibrate import TOKENIZER_FILES, masked_lm_inputs
from .arch.view import ModelView
from .checkpoint import DTYPES, Source, sha256_file
from .errors import GrowError
from .plan import RECIPE_FILE
from .layerwise import Runner, resolve_device
from .runtime import MASKS_FILE, load_masks

LENS_POSITIONS = 8  # sequence positions read through the logit lens at every layer boundary
DTYPE_CHECK_TOKENS = 8  # tokens of the short run in the output's own dtype


def load_model(path: Path, framework: str):
    """The model as transformers or timm load it, in float32, in eval mode; a folder they refuse is
    one sentence that names it."""
    try:
        with warnings.catch_warnings():
            # an empty module (Qwen2-MoE's shared expert when upcycling gave it no units) is initialised as a no-op
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            return _load(path, framework)
    except Exception as e:  # the frameworks raise many kinds; all mean the same to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GrowError(f"{'timm' if framework == 'timm' else 'transformers'} cannot load {path}: {reason}") from None


def model_entry(path: Path) -> dict:
    """How transformers loads the checkpoint at `path` (its spec's `models` entry)."""
    config = json.loads((path / "config.json").read_text())
    return spec_for(config, str(path / "config.json")).model_entry(architecture_name(config))


def _load(path: Path, framework: str):
    if framework == "timm":
        import timm

        return timm.create_model(f"local-dir:{path}", pretrained=True).float().eval()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    auto = getattr(transformers, model_entry(path)["auto_class"])
    return auto.from_pretrained(str(path), dtype=torch.float32).eval()


def sample_inputs(config: dict, framework: str, seed: int, batch: int = 2, seq_len: int = 32, vocab: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    if framework == "timm":
        size = config.get("pretrained_cfg", {}).get("input_size") or [3, 224, 224]
        return torch.randn((batch, *size), generator=gen)
    return torch.randint(0, vocab, (batch, seq_len), generator=gen)


def run(model, inputs: torch.Tensor, framework: str, output: str = "logits") -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs)
    return (out if framework == "timm" else getattr(out, output)).float()


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict:
    diff = (out - ref).double()
    logp, logq = torch.log_softmax(ref.double(), -1), torch.log_softmax(out.double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    return {
        "max_abs_diff": diff.abs().max().item(),
        "rel_error": (diff.norm() / ref.double().norm().clamp_min(1e-30)).item(),
        "top1_agreement": (ref.argmax(-1) == out.argmax(-1)).double().mean().item(),
        "kl": kl.item(),
    }


def check_made_from(source: Source, target: Source, recipe: dict) -> None:
    """Refuse, before any model is loaded, a pair that is not a source and what grow made from it: a
    DST whose grow.json records another source, or two models of different architectures."""
    made_from = recipe.get("source", {})
    recorded = made_from.get("files", {}).get("config.json")
    if recorded and recorded != sha256_file(source.path / "config.json"):
        raise GrowError(f"{target.path} was made from {made_from.get('id')}, not from {source.id} (their config.json "
                        f"differ); run grow verify {made_from.get('id')} {target.path}.")
    if not recipe and architecture_name(source.config) != architecture_name(target.config):
        raise GrowError(f"{source.id} is a {architecture_name(source.config)} and {target.path} a "
                        f"{architecture_name(target.config)}: different models, and {target.path} has no grow.json "
                        "saying it was made from the source; grow verify compares a source with what grow made from it.")


def sample_text(tokenizer_dir: Path, config: dict, vocab: int, objective: str | None, reserved_positions: int = 0,
                max_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Token ids of a fixed passage of the Python standard library and the labels of the head's own loss
    (the next tokens, or for a masked LM the tokens masked_lm_inputs hides), when a tokenizer is there."""
    if objective is None:
        return None  # a bare encoder has no head
    if not any((Path(tokenizer_dir) / f).is_file() for f in TOKENIZER_FILES):
        return None  # transformers would build an empty tokenizer that maps every word to unknown
    try:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception:
        return None
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:8000]
    limit = config.get("max_position_embeddings") or config.get("n_positions") or max_tokens
    ids = tok(text, return_tensors="pt")["input_ids"][:, : min(max_tokens, limit - reserved_positions)]
    if ids.shape[1] < 2 or int(ids.max()) >= vocab:
        return None
    if objective == "masked_lm":
        return masked_lm_inputs(ids, tok.mask_token_id) if tok.mask_token_id is not None else None
    return ids, ids


def layer_errors(ref: list[torch.Tensor], out: list[torch.Tensor]) -> list[dict]:
    """Relative error of the target's logit lens after every layer against the source's. Where the depths
    differ, each target boundary is paired with the source boundary it is closest to."""
    def rel(a, b):
        return ((b - a).double().norm() / a.double().norm().clamp_min(1e-30)).item()

    rows = []
    for j, o in enumerate(out):
        if len(ref) == len(out):
            k, err = j, rel(ref[j], o)
        else:
            k, err = min(((k, rel(r, o)) for k, r in enumerate(ref)), key=lambda e: e[1])
        rows.append({"layer": j - 1 if j else None, "source_layer": k - 1 if k else None, "rel_error": err})
    return rows


def verify(src, dst, *, tol: float = DEFAULT_TOL, seed: int = 0, device="cpu", loss_tokens: int = 1024,
           progress: Callable[[str, int, int | None], None] | None = None) -> dict:
    """Run source and target layer by layer (memory bounded by one layer, whatever the model size) on
    seeded inputs and compare their outputs, their logit lens after every layer, their loss on sample
    text, and the target run in its own dtype."""
    dev = resolve_device(device)
    source, target = Source(src), Source(dst)
    try:
        return _verify(source, target, tol=tol, seed=seed, dev=dev, loss_tokens=loss_tokens, progress=progress)
    finally:  # the layer loaders read both checkpoints through these
        source.close()
        target.close()


def _verify(source: Source, target: Source, *, tol: float, seed: int, dev, loss_tokens: int, progress) -> dict:
    spec = spec_for(source.config, str(source.path / "config.json"))
    framework = spec.framework
    entry = spec.model_entry(architecture_name(source.config)) if framework == "transformers" else {}
    sview, tview = _view(source), _view(target)
    recipe_path = target.path / RECIPE_FILE
    recipe = json.loads(recipe_path.read_text()) if recipe_path.is_file() else {}
    check_made_from(source, target, recipe)
    exact = bool(recipe.get("exact", True))
    masked = (target.path / MASKS_FILE).is_file()
    prepare = (lambda m: load_masks(target.path).attach(m)) if masked else None  # MSG: alpha = 0 is the source
    out_dtype = DTYPES[target.dtype]
    dtype_check = out_dtype in (torch.bfloat16, torch.float16)

    if framework == "timm":
        inputs = sample_inputs(source.config, framework, seed)
        keep, text = None, None
    else:
        vocab = min(sview.sizes["vocab"], tview.sizes["vocab"])
        inputs = sample_inputs(source.config, framework, seed, vocab=vocab)
        keep = slice(-LENS_POSITIONS, None)
        text = (sample_text(source.path, source.config, vocab, entry["objective"], spec.reserved_positions, loss_tokens)
                if loss_tokens else None)
    # progress counts layers run: source, target, (target in its dtype), (random baseline), each with its text
    passes = [(sview, 1 + (text is not None)), (tview, 1 + (text is not None) + dtype_check)]
    if not exact:
        passes.append((tview, 1 + (text is not None)))
    total = sum(len(v.layer_modules) * n for v, n in passes)
    done = [0]

    def tick():
        done[0] += 1
        if progress:
            progress("verifying", done[0], total)

    if progress:
        progress("verifying", 0, total)
    opts = dict(device=dev, on_layer=tick)
    topts = dict(opts, whole=lambda: load_model(target.path, framework))
    report: dict = {"source": source.id, "target": str(target.path), "method": recipe.get("method"),
                    "exact_expected": exact, "tolerance": tol}
    sopts = dict(opts, whole=lambda: load_model(source.path, framework))
    ref, ref_states, ref_lens, report["loss_source"], peak_src, _ = _run(sview, inputs, keep, text, **sopts)
    out, out_states, out_lens, report["loss_target"], peak_tgt, layered = _run(tview, inputs, keep, text, prepare=prepare, **topts)
    def cut(r, o):  # a bare encoder's output is its hidden state, and so is its lens
        return _common_width(r, o, entry["output_axis"], target.path, source.id) if entry.get("output_axis") else (r, o)

    ref, out = cut(ref, out)
    out_lens = [cut(ref_lens[0], o)[1] for o in out_lens]  # (depths may differ: cut each to the source's width)
    if ref.shape != out.shape:
        raise GrowError(f"{target.path} gives outputs of shape {list(out.shape)} where {source.id} gives "
                        f"{list(ref.shape)} (a different vocabulary or class count); they cannot be compared.")
    report.update(compare(ref, out))
    report["layers"] = layer_errors(ref_lens, out_lens)
    parted = [r for r in report["layers"] if r["rel_error"] > tol]
    report["first_divergent_layer"] = (parted[0]["layer"] if parted[0]["layer"] is not None else "embeddings") if parted else None
    report["peak_layer_bytes"] = max(peak_src, peak_tgt)
    report["layer_by_layer"] = layered
    if framework == "timm":
        del report["loss_source"], report["loss_target"]
    if dtype_check:
        causal = entry.get("objective") == "causal_lm"
        report["dtype_check"] = _dtype_check(tview, inputs, out, out_dtype, causal, prepare, topts)
    if not exact:
        base, _, _, base_loss, _, _ = _run(tview, inputs, None, text, random=True, seed=seed, lens=False, **opts)
        report["baseline_random_init"] = compare(*cut(ref, base))
        if framework == "transformers":
            report["baseline_random_init"]["loss"] = base_loss
        # a lossy method promises a better start than random: closer to the source's predictions
        report["beats_random_init"] = report["kl"] < report["baseline_random_init"]["kl"]
    report["failure"] = _failure(report, target.path, source.id)
    report["passed"] = report["failure"] is None
    return report


def _failure(report: dict, target: Path, source: str) -> str | None:
    """One sentence saying why verification failed, or None."""
    check = report.get("dtype_check")
    if check and not check["ran"]:
        return check["error"]
    if report["exact_expected"] and report["rel_error"] > report["tolerance"]:
        where = report["first_divergent_layer"]
        at = f"; they first part {'at the embeddings' if where == 'embeddings' else f'after layer {where}'}" if where is not None else ""
        return (f"{target} does not reproduce {source}: relative error {report['rel_error']:.3g} exceeds "
                f"{report['tolerance']:g}{at}.")
    return None


def _view(source: Source) -> ModelView:
    try:
        return ModelView(source)
    except GrowError as e:
        raise GrowError(f"cannot load {source.path}: {e}") from None


def _run(view: ModelView, inputs, keep, text, *, lens: bool = True, **opts):
    """One model's outputs, logit lens per layer boundary, sample-text loss and peak parameter bytes."""
    runner = Runner(view, **opts)
    try:
        try:
            out, states = runner.forward(inputs, keep)
            # the stages of a staged model (ConvNeXt) differ in width: only the last one's states reach the head
            lensed = runner.lens(states) if lens and not view.spec.stages else []
            loss = runner.loss(*text) if text is not None else None
        except GrowError:
            raise
        except Exception as e:  # the frameworks raise many kinds; all mean the same to the user
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GrowError(f"{view.spec.framework} cannot run {view.source.path}: {reason}") from None
        return out, states, lensed, loss, runner.loader.peak, runner.layer_by_layer
    finally:
        runner.close()


def _dtype_check(view: ModelView, inputs, out32: torch.Tensor, dtype: torch.dtype, causal: bool, prepare, opts) -> dict:
    """A short run in the output's own dtype (one input; for a causal LM its first tokens, whose outputs
    do not depend on the rest): an output that only runs in float32 is a failure."""
    name = str(dtype).removeprefix("torch.")
    short = inputs[:1, :DTYPE_CHECK_TOKENS] if causal else inputs[:1]
    runner = Runner(view, dtype=dtype, prepare=prepare, **opts)
    try:
        out, _ = runner.forward(short)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {"dtype": name, "ran": False, "error": f"{view.source.path} does not run in {name}: {reason}"}
    finally:
        runner.close()
    if not torch.isfinite(out).all():
        return {"dtype": name, "ran": False, "error": f"{view.source.path} gives non-finite outputs in {name}."}
    ref = out32[:1, : out.shape[1]] if causal else out32[:1]
    return {"dtype": name, "ran": True, **compare(ref, out[..., : ref.shape[-1]])}  # a bare encoder's cut width


def _common_width(ref: torch.Tensor, out: torch.Tensor, axis: str, target: Path, source: str):
    """A wider target's hidden state cut to the source's width (every growth keeps the source's entries
    first); a narrower one cannot be compared."""
    if out.shape[:-1] == ref.shape[:-1] and out.shape[-1] > ref.shape[-1]:
        return ref, out[..., : ref.shape[-1]]
    if out.shape[:-1] == ref.shape[:-1] and out.shape[-1] < ref.shape[-1]:
        raise GrowError(f"{target} is narrower than {source} in its {axis} width, and a bare encoder's output has "
                        "that width, so the two cannot be compared; verify the model with its masked-LM head instead.")
    return ref, out
