"""Benchmark: HyperCloning x2 of a Llama-shaped bf16 checkpoint, against two baselines in the same run.

  floor      copy as many bytes as grow writes, from the source files to the same disk (the disk floor)
  grow       grow.expand(..., method="hypercloning", factor=2), streaming
  in-memory  load with transformers, build the same tensors in memory, save_pretrained

Each runs in a child process of its own (so its peak RSS is its own) and ends with os.sync(), so
every figure includes getting the bytes to disk. Prints a table and checks the goals:
peak RSS below 2x the largest output tensor + 1 GB, throughput at least half the floor.

    python scripts/bench_expand.py [--layers 13] [--workdir .cache/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9


def make_source(path: Path, layers: int) -> None:
    """A Llama-7B-shaped model cut to `layers` layers (hidden 2048), random bf16, in two shards."""
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                                   num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                                   tie_word_embeddings=False, dtype="bfloat16",
                                   architectures=["LlamaForCausalLM"])
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg.save_pretrained(tmp)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for k, part in enumerate(halves):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16) for n in part}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        del tensors
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    os.rename(tmp, path)


def run_floor(src: Path, dst: Path, nbytes: int) -> None:
    files = sorted(src.glob("*.safetensors"))
    dst.mkdir()
    written, k = 0, 0
    with open(dst / "copy.bin", "wb") as out:
        while written < nbytes:
            with open(files[k % len(files)], "rb") as f:
                while written < nbytes and (block := f.read(min(1 << 24, nbytes - written))):
                    out.write(block)
                    written += len(block)
            k += 1


def run_grow(src: Path, dst: Path) -> None:
    import grow

    grow.expand(src, dst, method="hypercloning", factor=2)


def run_in_memory(src: Path, dst: Path) -> None:
    import torch
    import transformers

    import grow.ops.hypercloning as hc
    from grow.arch.view import ModelView
    from grow.checkpoint import Source
    from grow.plan import materialize

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    state = model.state_dict()
    plan = hc.build(ModelView(Source(src)), factor=2)  # the same math, applied to tensors held in memory
    new_state = {r.name: materialize(r, state.__getitem__) for r in plan.recipes}
    del model, state
    config = transformers.AutoConfig.for_model(**plan.config)
    with torch.device("meta"):
        target = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    target.load_state_dict(new_state, assign=True)
    target.save_pretrained(dst)


def child(which: str, src: Path, dst: Path, nbytes: int) -> None:
    start = time.perf_counter()
    {"floor": lambda: run_floor(src, dst, nbytes), "grow": lambda: run_grow(src, dst),
     "in-memory": lambda: run_in_memory(src, dst)}[which]()
    os.sync()
    seconds = time.perf_counter() - start
    written = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    with open("/proc/self/status") as f:  # VmHWM: this process's own peak (ru_maxrss survives exec)
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "bytes": written, "peak_rss": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=13, help="13 layers give a 1.6 GB source")
    ap.add_argument("--workdir", type=Path, default=Path(".cache/bench"))
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        which, src, dst, nbytes = args.child
        return child(which, Path(src), Path(dst), int(nbytes))

    src = args.workdir / f"llama-h2048-l{args.layers}-bf16"
    if not src.exists():
        print(f"generating {src} ...", file=sys.stderr)
        make_source(src, args.layers)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import grow
    from grow.checkpoint import Source, tensor_nbytes

    source = Source(src)
    src_bytes = sum(f.stat().st_size for f in source.files)
    plan = grow.expand(src, None, factor=2, dry_run=True)["plan"]
    out_bytes = plan["bytes"]
    largest = max(tensor_nbytes(t["dtype"], t["shape"]) for t in plan["tensors"])

    for f in source.files:  # same start for everyone: the source in the page cache
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    results = {}
    for which in ("floor", "grow", "in-memory"):
        dst = args.workdir / f"out-{which}"
        shutil.rmtree(dst, ignore_errors=True)
        proc = subprocess.run([sys.executable, __file__, "--child", which, str(src), str(dst), str(out_bytes)],
                              capture_output=True, text=True)
        shutil.rmtree(dst, ignore_errors=True)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"{which} failed")
        results[which] = json.loads(proc.stdout.strip().splitlines()[-1])

    budget = 2 * largest + GB
    floor_tp = results["floor"]["bytes"] / results["floor"]["seconds"]
    print(f"source {src_bytes / GB:.2f} GB bf16 ({source.num_parameters / 1e6:.0f} M params) -> "
          f"target {out_bytes / GB:.2f} GB; largest output tensor {largest / GB:.3f} GB")
    print(f"{'approach':<10} {'seconds':>8} {'write GB/s':>10} {'peak RSS GB':>12} {'vs floor':>9}")
    for which, r in results.items():
        tp = r["bytes"] / r["seconds"]
        print(f"{which:<10} {r['seconds']:>8.2f} {tp / GB:>10.2f} {r['peak_rss'] / GB:>12.2f} {tp / floor_tp:>8.0%}")
    g = results["grow"]
    print(f"goal: grow peak RSS {g['peak_rss'] / GB:.2f} GB < 2 x largest + 1 GB = {budget / GB:.2f} GB: "
          f"{'met' if g['peak_rss'] < budget else 'MISSED'}")
    ratio = (g["bytes"] / g["seconds"]) / floor_tp
    print(f"goal: grow throughput {ratio:.0%} of the floor >= 50%: {'met' if ratio >= 0.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
