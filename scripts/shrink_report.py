"""Training evidence for shrinking: a shrunk model is a better start for training than a random one.

Trains a small Llama on the Python standard library (with its own BPE tokenizer), shrinks it with
weight selection and with weight subcloning, then trains each shrunk model and a randomly initialised
model of the same shape for the same steps on the same batches, and prints held-out losses as a
Markdown table. Runs on CPU in a few minutes; `--quick` uses the test-sized model.

    python scripts/shrink_report.py [--work DIR] [--finetune-steps N] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import trained_models as T  # noqa: E402

import grow  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, help="folder for the models (kept; the trained source is reused)")
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="the test-sized model instead of the report-sized one")
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    setup = T.TEST if args.quick else T.REPORT
    work = args.work or Path(tempfile.mkdtemp(prefix="shrink_report_"))
    src = work / "source"
    start = time.time()
    if not (src / "config.json").is_file():
        print(f"training the source ({setup.steps} steps) in {src} ...", file=sys.stderr)
        T.build_trained(src, setup)
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    held_out, stream = T.held_out(tok, setup), T.training_stream(src, setup)
    shape = dict(hidden=setup.hidden // 2, ffn=setup.ffn // 2, heads=setup.heads // 2,
                 kv_heads=max(1, setup.kv_heads // 2), layers=setup.layers * 2 // 3)

    source = transformers.AutoModelForCausalLM.from_pretrained(str(src))
    rows = [("source", source.num_parameters(), T.loss(source, held_out), None)]
    dst = None
    for method in ("select", "subclone"):
        dst = work / method
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # calibration must run on real tokens
            grow.shrink(src, dst, method=method, force=True, **shape)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(dst))
        before = T.loss(model, held_out)
        T.train(model, stream, setup, args.finetune_steps, seed=1)
        rows.append((method, model.num_parameters(), before, T.loss(model, held_out)))
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(dst)))
    before = T.loss(model, held_out)
    T.train(model, stream, setup, args.finetune_steps, seed=1)
    rows.append(("random init", model.num_parameters(), before, T.loss(model, held_out)))

    src_shape = dict(hidden=setup.hidden, ffn=setup.ffn, heads=setup.heads, kv_heads=setup.kv_heads, layers=setup.layers)
    print(f"Llama trained {setup.steps} steps on the Python standard library ({len(tok)}-token BPE); "
          f"shrunk {src_shape} -> {shape}; each shrunk model and a random init trained {args.finetune_steps} "
          f"more steps on the same batches. Held-out loss (nats/token) on {held_out.numel()} tokens of unseen files.\n")
    print(f"| model | parameters | held-out loss, step 0 | after {args.finetune_steps} steps |")
    print("|---|---:|---:|---:|")
    for name, params, before, after in rows:
        print(f"| {name} | {params:,} | {before:.3f} | {'' if after is None else f'{after:.3f}'} |")
    print(f"\n({time.time() - start:.0f} s; training runs on one CPU thread)", file=sys.stderr)


if __name__ == "__main__":
    main()
