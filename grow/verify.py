"""Load source and target in the framework users use, run both on seeded inputs, and compare."""

from __future__ import annotations

import json
import sysconfig
import warnings
from pathlib import Path

import torch

from . import DEFAULT_TOL
from .arch.spec import architecture_name, spec_for
from .calibrate import TOKENIZER_FILES, masked_lm_inputs
from .checkpoint import Source, sha256_file
from .errors import GrowError
from .plan import RECIPE_FILE
from .runtime import MASKS_FILE, load_masks


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


def random_model_like(path: Path, framework: str, seed: int):
    """A freshly initialised model with the target's shape: the baseline a lossy method must beat."""
    torch.manual_seed(seed)
    if framework == "timm":
        import timm

        cfg = json.loads((path / "config.json").read_text())
        return timm.create_model(cfg["architecture"], pretrained=False, **cfg.get("model_args", {})).float().eval()
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path))
    auto = getattr(transformers, model_entry(path)["auto_class"])
    return auto.from_config(config, dtype=torch.float32).eval()


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


def sample_text_loss(model, tokenizer_dir: Path, max_tokens: int = 1024, objective: str | None = "causal_lm",
                     reserved_positions: int = 0) -> float | None:
    """The head's own loss on a fixed passage of the Python standard library, when a tokenizer is there:
    next-token loss, or for a masked LM the loss on the tokens masked_lm_inputs hides."""
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
    limit = getattr(model.config, "max_position_embeddings", None) or max_tokens  # GPT-2's n_positions too
    ids = tok(text, return_tensors="pt")["input_ids"][:, : min(max_tokens, limit - reserved_positions)]
    if ids.shape[1] < 2 or int(ids.max()) >= model.get_input_embeddings().num_embeddings:
        return None
    labels = ids
    if objective == "masked_lm":
        if tok.mask_token_id is None:
            return None
        ids, labels = masked_lm_inputs(ids, tok.mask_token_id)
    with torch.no_grad():
        return model(ids, labels=labels).loss.item()


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


def verify(src, dst, *, tol: float = DEFAULT_TOL, seed: int = 0, progress=None) -> dict:
    """progress("verifying", steps done, steps) as models are loaded and run."""
    source = Source(src)
    target = Source(dst)
    spec = spec_for(source.config, str(source.path / "config.json"))
    framework, entry = spec.framework, spec.model_entry(architecture_name(source.config))
    recipe_path = target.path / RECIPE_FILE
    recipe = json.loads(recipe_path.read_text()) if recipe_path.is_file() else {}
    check_made_from(source, target, recipe)
    exact = bool(recipe.get("exact", True))
    steps = 3 if exact else 4

    def step(done: int) -> None:
        if progress:
            progress("verifying", done, steps)

    step(0)
    ref_model = load_model(source.path, framework)
    tgt_model = load_model(target.path, framework)
    step(1)
    if (target.path / MASKS_FILE).is_file():
        load_masks(target.path).attach(tgt_model)  # MSG: the grown model at alpha = 0 is the source
    if framework == "timm":
        inputs = sample_inputs(source.config, framework, seed)
    else:
        vocab = min(ref_model.get_input_embeddings().num_embeddings, tgt_model.get_input_embeddings().num_embeddings)
        inputs = sample_inputs(source.config, framework, seed, vocab=vocab)
    output = entry["output"]
    ref, out = run(ref_model, inputs, framework, output), run(tgt_model, inputs, framework, output)
    if entry["output_axis"] and out.shape[:-1] == ref.shape[:-1] and out.shape[-1] > ref.shape[-1]:
        out = out[..., : ref.shape[-1]]  # a wider width space: every growth keeps the source's entries first
    if ref.shape != out.shape and entry["output_axis"]:
        raise GrowError(f"{target.path} is narrower than {source.id} in its {entry['output_axis']} width, and a bare "
                        f"encoder's output ({output}) has that width, so the two cannot be compared; verify the "
                        "model with its masked-LM head instead.")
    step(2)
    if ref.shape != out.shape:
        raise GrowError(f"{target.path} gives outputs of shape {list(out.shape)} where {source.id} gives "
                        f"{list(ref.shape)} (a different vocabulary or class count); they cannot be compared.")
    report = {
        "source": source.id,
        "target": str(target.path),
        "method": recipe.get("method"),
        "exact_expected": exact,
        "tolerance": tol,
        **compare(ref, out),
    }
    if framework == "transformers":
        loss = {"objective": entry["objective"], "reserved_positions": spec.reserved_positions}
        report["loss_source"] = sample_text_loss(ref_model, source.path, **loss)
        report["loss_target"] = sample_text_loss(tgt_model, source.path, **loss)
    step(3)
    if not exact:
        del tgt_model
        baseline = random_model_like(target.path, framework, seed)
        report["baseline_random_init"] = compare(ref, run(baseline, inputs, framework, output))
        if framework == "transformers":
            report["baseline_random_init"]["loss"] = sample_text_loss(baseline, source.path, **loss)
        # a lossy method promises a better start than random: closer to the source's predictions
        report["beats_random_init"] = report["kl"] < report["baseline_random_init"]["kl"]
        step(4)
    report["passed"] = (report["rel_error"] <= tol) if exact else True
    return report
