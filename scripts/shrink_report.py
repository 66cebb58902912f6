"""Evidence for shrinking: what a shrunk model keeps before any training, and that it trains better
than a random start.

Trains a small Llama on the Python standard library (with its own BPE tokenizer; cached in --work),
then
1. cuts it a third narrower, a third shallower, with a smaller FFN, fewer heads, and all together, with
   every subcloning option (and weight selection), and prints the held-out perplexity of each before
   any training next to the source's;
2. trains the default subclone, the weight selection and a random init of the same shape for the same
   steps on the same batches, and prints held-out losses.
Runs on CPU; `--quick` uses the test-sized model. `--all-families` instead trains a small model of
every architecture grow shrinks (scripts/trained_models.py FAMILIES), shrinks each with every method
its spec allows, trains the shrunk models and a random init of the same config alike, and prints
the held-out losses.

    python scripts/shrink_report.py [--work DIR] [--finetune-steps N] [--quick] [--skip-training|--skip-perplexity]
    python scripts/shrink_report.py --all-families [--families bert,roberta] [--finetune-steps N]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch

import trained_models as T

import grow

# the defaults before issue 13, each gain alone, today's default, and the other options
BEFORE = dict(residual="activation", layer_removal="middle", unit_ranking="activation")
DEFAULT = dict(residual="pca", layer_removal="influence", unit_ranking="activation")
SUBCLONE_OPTIONS = [BEFORE, dict(BEFORE, residual="pca"), dict(BEFORE, layer_removal="influence"), DEFAULT,
                    dict(DEFAULT, layer_removal="loss"), dict(DEFAULT, unit_ranking="contribution")]
OPTION_NAMES = ("residual", "layer_removal", "unit_ranking")


def cuts(setup: T.Setup) -> list[tuple[str, dict]]:
    heads, kv = setup.heads // 2, max(1, setup.kv_heads // 2)  # Llama needs hidden % heads == 0: 6 of 8 cannot
    hidden = setup.hidden * 2 // 3 // setup.heads * setup.heads  # a multiple of the heads, as Llama requires
    layers = setup.layers * 2 // 3
    ffn = setup.ffn * 2 // 3
    return [
        (f"--hidden {hidden}", dict(hidden=hidden)),
        (f"--layers {layers}", dict(layers=layers)),
        (f"--ffn {ffn}", dict(ffn=ffn)),
        (f"--heads {heads} --kv-heads {kv}", dict(heads=heads, kv_heads=kv)),
        ("all of them", dict(hidden=hidden, layers=layers, ffn=ffn, heads=heads, kv_heads=kv)),
    ]


def effective(options: dict, cut: dict) -> tuple:
    """The options that change the model for this cut (pca needs a hidden cut, influence a layer cut, the unit
    ranking an FFN or head cut)."""
    return (options["residual"] if "hidden" in cut else None, options["layer_removal"] if "layers" in cut else None,
            options["unit_ranking"] if {"ffn", "heads"} & set(cut) else None)


def shrink(src: Path, dst: Path, scores: Path, method: str, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibration must run on real tokens
        if method == "subclone":
            options["scores"] = scores
        grow.shrink(src, dst, method=method, force=True, **options)
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(dst))


def perplexity_table(src: Path, work: Path, setup: T.Setup, task: T.Task, source_ppl: float) -> None:
    scores = work / "scores.safetensors"
    print(f"| `grow shrink` | perplexity | x source |\n|---|---:|---:|\n| source | {source_ppl:.2f} | 1.0 |")
    for cut_label, cut in cuts(setup):
        rows = [(f"select {cut_label}", "select", {})]
        seen = set()
        for opts in SUBCLONE_OPTIONS:
            used = effective(opts, cut)
            if used in seen:  # an option the cut does not use gives the same model
                continue
            seen.add(used)
            flags = [f"--{k.replace('_', '-')} {v}" for k, v in zip(OPTION_NAMES, used) if v]
            marks = [m for m, o in (("before", BEFORE), ("default", DEFAULT)) if effective(o, cut) == used]
            rows.append((f"subclone {cut_label} {' '.join(flags)} ({', '.join(marks) or 'option'})", "subclone", opts))
        for label, method, opts in rows:
            model = shrink(src, work / "cut", scores, method, **cut, **opts)
            ppl = math.exp(T.loss(model, task))
            print(f"| {label.replace('  ', ' ')} | {ppl:.2f} | {ppl / source_ppl:.2f} |", flush=True)


def training_table(src: Path, work: Path, setup: T.Setup, task: T.Task, steps: int, source_loss: float) -> None:
    import transformers

    shape = dict(hidden=setup.hidden // 2, ffn=setup.ffn // 2, heads=setup.heads // 2,
                 kv_heads=max(1, setup.kv_heads // 2), layers=setup.layers * 2 // 3)
    rows = []
    for method in ("select", "subclone"):
        model = shrink(src, work / method, work / "scores.safetensors", method, **shape)
        before = T.loss(model, task)
        T.train(model, task, setup, steps, seed=1)
        rows.append((f"{method} (default options)", model.num_parameters(), before, T.loss(model, task)))
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(work / "subclone")))
    before = T.loss(model, task)
    T.train(model, task, setup, steps, seed=1)
    rows.append(("random init", model.num_parameters(), before, T.loss(model, task)))
    print(f"\nShrunk to {shape}; each shrunk model and a random init of the same shape trained {steps} more steps "
          "on the same batches. Held-out loss (nats/token):\n")
    print(f"| model | parameters | held-out loss, step 0 | after {steps} steps |")
    print("|---|---:|---:|---:|")
    print(f"| source | | {source_loss:.3f} | |")
    for name, params, before, after in rows:
        print(f"| {name} | {params:,} | {before:.3f} | {after:.3f} |")


def family_table(work: Path, steps: int, names: list[str]) -> None:
    """Every family (or those named): the held-out loss of the training data's token (class) frequencies,
    the source's, and each shrunk model's and the random init's at step 0 and after `steps` steps."""
    setup = T.FAMILY
    data = T.family_data(work / "data", setup)
    print(f"Every family at hidden {setup.hidden}, {setup.heads} heads / {setup.kv_heads} kv, FFN {setup.ffn}, "
          f"{setup.layers} layers, trained {setup.steps} steps (masked LMs: as causal LMs, then {setup.masked_lm_steps} "
          f"steps as masked LMs at lr {setup.masked_lm_lr:g}); shrunk to {dict(T.FAMILIES['llama'].shrink)} "
          f"(head width kept; MoE: --experts 2 and no --ffn), then {steps} steps for each shrunk model and a "
          "random init of its config on the same batches. Held-out loss (nats per token; per image for ViT); "
          "frequencies: the loss of predicting the training data's token (class) frequencies:\n")
    print(f"| family | objective | frequencies | source | select: step 0 -> {steps} | subclone: step 0 -> {steps} "
          f"| random init: step 0 -> {steps} |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in names:
        family = T.FAMILIES[name]
        folder = work / name
        src = T.build_trained_family(folder / "source", name, data, setup)
        losses = T.shrink_and_train(src, folder, name, data, setup, steps)
        cells = [f"{losses[m][0]:.3f} -> {losses[m][1]:.3f}" if m in losses else "not offered"
                 for m in ("select", "subclone", "random")]
        print(f"| {name} | {family.objective} | {T.frequency_loss(T.family_task(name, data)):.3f} "
              f"| {losses['source']:.3f} | {' | '.join(cells)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(".cache/shrink_report"),
                    help="folder for the models (the trained source is kept and reused)")
    ap.add_argument("--finetune-steps", type=int, default=None, help="default: 200 (60 with --all-families)")
    ap.add_argument("--quick", action="store_true", help="the test-sized model instead of the report-sized one")
    ap.add_argument("--skip-training", action="store_true", help="print the perplexity table only")
    ap.add_argument("--skip-perplexity", action="store_true", help="print the training table only")
    ap.add_argument("--all-families", action="store_true",
                    help="the training claim on a small model of every family (the --finetune-steps default: 60)")
    ap.add_argument("--families", default=",".join(T.FAMILIES),
                    help="with --all-families: only these (comma-separated; default: all)")
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    if args.all_families:
        start = time.time()
        names = [n.strip() for n in args.families.split(",") if n.strip()]
        unknown = [n for n in names if n not in T.FAMILIES]
        if unknown:
            ap.error(f"--families: no family {', '.join(unknown)}; choose from {', '.join(T.FAMILIES)}")
        family_table(args.work / "families", 60 if args.finetune_steps is None else args.finetune_steps, names)
        print(f"\n({time.time() - start:.0f} s; training runs on one CPU thread)", file=sys.stderr)
        return
    setup = T.TEST if args.quick else T.REPORT
    work = args.work / ("quick" if args.quick else "report")
    src = work / "source"
    start = time.time()
    if not (src / "config.json").is_file():
        print(f"training the source ({setup.steps} steps) in {src} ...", file=sys.stderr)
        T.build_trained(src, setup)
    (work / "scores.safetensors").unlink(missing_ok=True)  # calibrate on this run's code
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    task = T.language_task(src, setup)
    held_out = task.held_out
    source_loss = T.loss(transformers.AutoModelForCausalLM.from_pretrained(str(src)), task)
    print(f"Llama (hidden {setup.hidden}, ffn {setup.ffn}, {setup.heads} heads / {setup.kv_heads} kv, {setup.layers} "
          f"layers) trained {setup.steps} steps on the Python standard library ({len(tok)}-token BPE). Held-out "
          f"text: {held_out.numel()} tokens of standard-library files no model was trained on; calibration: "
          "the default (8192 tokens of the standard library). Perplexity before any training:\n")
    if not args.skip_perplexity:
        perplexity_table(src, work, setup, task, math.exp(source_loss))
    if not args.skip_training:
        training_table(src, work, setup, task, args.finetune_steps or 200, source_loss)
    print(f"\n({time.time() - start:.0f} s; training runs on one CPU thread)", file=sys.stderr)


if __name__ == "__main__":
    main()
