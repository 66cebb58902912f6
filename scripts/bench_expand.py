"""Benchmark: HyperCloning x2 of a Llama-shaped bf16 checkpoint, against `cp` in the same run.

  cp              `cp -r` of the source folder, as many times as it takes to write the bytes grow
                  writes, then `sync` (the disk floor)
  grow            grow.expand(..., method="hypercloning", factor=2): the default, copies split
                  element-wise at random (exact in bf16), streaming, then `sync`
  grow --no-noise the same with plain 1/n copies (noise=False), then `sync`
  in-memory       (--in-memory) load with transformers, build the same tensors in memory, save_pretrained

cp, grow and grow --no-noise alternate, --runs times each, and the medians are compared. Each runs in
a child process of its own (so its peak RSS and CPU time are its own), and every figure includes getting
the bytes to disk. Prints a table (wall seconds of every run, median, ratio to cp, user + system CPU
seconds of the median run, peak RSS) and checks the goals: grow at most 1.2x the time of cp for the
same bytes, peak RSS below 2x the largest output tensor + 1 GB. A grow run's start-up (importing grow
and torch) is part of its time and is also printed on its own.

    python scripts/bench_expand.py [--layers 13] [--runs 3] [--in-memory] [--workdir .cache/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's grow, in the children too


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


def run_cp(src: Path, dst: Path, nbytes: int) -> None:
    dst.mkdir()
    src_bytes = sum(p.stat().st_size for p in src.iterdir())
    for k in range(-(-nbytes // src_bytes)):
        subprocess.run(["cp", "-r", str(src), str(dst / str(k))], check=True)


def run_grow(src: Path, dst: Path, noise: bool = True) -> None:
    import grow

    grow.expand(src, dst, method="hypercloning", factor=2, noise=noise)


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


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its children (cp's time is its children's)."""
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def child(which: str, src: Path, dst: Path, nbytes: int) -> None:
    os.sync()  # others' dirty pages are flushed before the clock and the CPU count start
    before = cpu_seconds()
    start = time.perf_counter()
    if which != "cp":
        import grow.api  # noqa: F401  (grow.plan imports torch: start-up, timed on its own too)
        import grow.plan  # noqa: F401
    startup = time.perf_counter() - start if which != "cp" else 0.0
    {"cp": lambda: run_cp(src, dst, nbytes), "grow": lambda: run_grow(src, dst),
     "grow --no-noise": lambda: run_grow(src, dst, noise=False), "in-memory": lambda: run_in_memory(src, dst)}[which]()
    os.sync()
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - before
    written = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    with open("/proc/self/status") as f:  # VmHWM: this process's own peak (ru_maxrss survives exec)
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "startup": startup, "cpu": cpu, "bytes": written, "peak_rss": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=13, help="13 layers give a 1.6 GB source")
    ap.add_argument("--runs", type=int, default=3, help="runs of cp and of grow, alternating")
    ap.add_argument("--in-memory", action="store_true", help="also the in-memory way (needs about 8 GB of RAM)")
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
    order = ["cp", "grow", "grow --no-noise"] * args.runs + (["in-memory"] if args.in_memory else [])
    results: dict[str, list[dict]] = {}
    for which in order:
        dst = args.workdir / f"out-{which.split()[0]}"
        shutil.rmtree(dst, ignore_errors=True)
        proc = subprocess.run([sys.executable, __file__, "--child", which, str(src), str(dst), str(out_bytes)],
                              capture_output=True, text=True)
        shutil.rmtree(dst, ignore_errors=True)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"{which} failed")
        results.setdefault(which, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def tp(r):
        return r["bytes"] / r["seconds"]

    median = {w: sorted(rs, key=tp)[len(rs) // 2] for w, rs in results.items()}
    budget = 2 * largest + GB
    print(f"source {src_bytes / GB:.2f} GB bf16 ({source.num_parameters / 1e6:.0f} M params) -> "
          f"target {out_bytes / GB:.2f} GB; largest output tensor {largest / GB:.3f} GB; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'approach':<16} {'wall seconds of each run':<26} {'median':>7} {'vs cp':>6} {'GB/s':>5} "
          f"{'CPU s':>6} {'peak RSS GB':>11} {'start-up s':>10}")
    cp_tp = tp(median["cp"])
    for which, rs in results.items():
        times = " ".join(f"{out_bytes / tp(r):.1f}" for r in rs)
        m = median[which]
        print(f"{which:<16} {times:<26} {out_bytes / tp(m):>7.2f} {cp_tp / tp(m):>5.2f}x {tp(m) / GB:>5.2f} "
              f"{m['cpu']:>6.1f} {max(r['peak_rss'] for r in rs) / GB:>11.2f} {m['startup']:>10.2f}")
    print("(seconds scaled to the bytes grow writes; CPU s: user + system of the median run; start-up: importing\n"
          " grow and torch, part of the median run's wall seconds)")
    for which in ("grow", "grow --no-noise"):
        rss = max(r["peak_rss"] for r in results[which])
        ratio = cp_tp / tp(median[which])
        print(f"goal: {which}: {ratio:.2f}x the time of cp + sync for the same bytes (at most 1.2x): "
              f"{'met' if ratio <= 1.2 else 'MISSED'}; peak RSS {rss / GB:.2f} GB < 2 x largest + 1 GB = "
              f"{budget / GB:.2f} GB: {'met' if rss < budget else 'MISSED'}")


if __name__ == "__main__":
    main()
