"""Benchmark: models larger than RAM. Not part of the test suite (it writes ~40 GB and runs for a long time).

  1. a Llama-2-7B-shaped bf16 source (13.5 GB), written tensor by tensor without building a model,
     grown to twice the depth with stack (27 GB out), then `grow verify`;
  2. a Llama-3.2-3B-shaped bf16 source (6.4 GB) grown with HyperCloning x2 (25.7 GB out), then `grow verify`.

For each: `cp` of the source plus `sync` as the disk baseline (measured in the same run), grow's wall
time (ending with `sync`) and throughput against cp, and the peak RSS of the grow and verify processes
(each a child of its own; VmHWM from wait4). Free disk space is checked first, and everything written
is deleted as soon as it is no longer needed.

    python scripts/bench_big.py [--workdir .cache/bench-big] [--only 7b|3b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

GB = 1e9
ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0,
               max_position_embeddings=4096),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
               rope_theta=500000.0, max_position_embeddings=131072),
}
GROW_ARGS = {"7b": lambda layers: ["--method", "stack", "--layers", str(2 * layers)],
             "3b": lambda layers: ["--method", "hypercloning", "--factor", "2"]}
OUT_FACTOR = {"7b": 2.0, "3b": 4.0}  # output bytes / source bytes (about)


def llama_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    out.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h)))
    return out


def write_source(path: Path, cfg: dict) -> int:
    """Config and sharded bf16 safetensors, written tensor by tensor: random weights (slices of one
    random pool, scaled like a trained model's) and norm weights of one."""
    import torch

    from grow.writer import ShardedWriter

    cfg = dict(cfg, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
               rms_norm_eps=1e-5, dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shapes = llama_shapes(cfg)
    writer = ShardedWriter(path, [(n, "BF16", s) for n, s in shapes], 5 * 10**9)
    pool = (torch.randn(1 << 26, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    offset = 0
    for name, shape in shapes:
        if len(shape) == 1:
            writer.write(name, torch.ones(shape, dtype=torch.bfloat16))
            continue
        n = shape[0] * shape[1]
        reps = -(-(offset % pool.numel() + n) // pool.numel())
        flat = pool.repeat(reps)[offset % pool.numel(): offset % pool.numel() + n] if reps > 1 else pool[offset: offset + n]
        writer.write(name, flat.reshape(shape))
        offset = (offset + 7919 * 4099) % pool.numel()
    writer.close()
    (path / "config.json").write_text(json.dumps(cfg, indent=2))  # last: a folder with a config is complete
    os.sync()
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def run_child(cmd: list[str], stdout: Path | None = None) -> tuple[float, int, int]:
    """Wall seconds (ending with a sync), the child's own peak RSS (from wait4), and its exit code."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        if stdout is not None:
            os.dup2(os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    os.sync()
    return time.perf_counter() - start, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def grow_cmd(*args: str) -> list[str]:
    return ["nice", "-n", "10", sys.executable, "-m", "grow", *args]


def shape(kind: str, layers: int | None) -> dict:
    return dict(SHAPES[kind], **({"num_hidden_layers": layers} if layers else {}))


def case(kind: str, work: Path, layers: int | None) -> dict:
    cfg = shape(kind, layers)
    grow_args = GROW_ARGS[kind](cfg["num_hidden_layers"])
    src, copy, dst = work / f"src-{kind}", work / f"cp-{kind}", work / f"out-{kind}"
    for p in (copy, dst):
        shutil.rmtree(p, ignore_errors=True)
    if (src / "config.json").is_file() and json.loads((src / "config.json").read_text())["num_hidden_layers"] == cfg["num_hidden_layers"]:
        src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))  # left by an interrupted run
    else:
        t = time.perf_counter()
        src_bytes = write_source(src, cfg)
        print(f"[{kind}] wrote the source: {src_bytes / GB:.1f} GB in {time.perf_counter() - t:.0f} s", flush=True)
    cp_s, _, _ = run_child(["cp", "-r", str(src), str(copy)])
    shutil.rmtree(copy)
    grow_s, grow_rss, rc = run_child(grow_cmd("expand", str(src), str(dst), *grow_args, "--quiet"))
    if rc:
        raise SystemExit(f"grow expand failed ({rc})")
    out_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    print(f"[{kind}] grow: {out_bytes / GB:.1f} GB in {grow_s:.0f} s", flush=True)
    report_file = work / f"verify-{kind}.json"
    verify_s, verify_rss, rc = run_child(grow_cmd("verify", str(src), str(dst), "--json", "--quiet"), report_file)
    if rc not in (0, 3):
        raise SystemExit(f"grow verify failed ({rc})")
    report = json.loads(report_file.read_text())
    report_file.unlink()
    shutil.rmtree(dst)
    shutil.rmtree(src)
    return {"kind": kind, "grow": " ".join(grow_args), "source_bytes": src_bytes, "out_bytes": out_bytes,
            "cp_seconds": cp_s, "grow_seconds": grow_s, "grow_rss": grow_rss, "verify_seconds": verify_s,
            "verify_rss": verify_rss, "passed": report["passed"], "exact": report["exact_expected"],
            "rel_error": report["rel_error"], "peak_layer_bytes": report["peak_layer_bytes"],
            "dtype_check": report.get("dtype_check", {}).get("ran")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(".cache/bench-big"))
    ap.add_argument("--only", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, help="fewer layers than the real shapes, for a quick try of the script")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    kinds = [args.only] if args.only else ["7b", "3b"]
    need = max(_source_bytes(shape(k, args.layers)) * (1 + OUT_FACTOR[k]) for k in kinds)  # source + (its copy, then the output)
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    print(f"needs {need / GB:.0f} GB free under {args.workdir}; {free / GB:.0f} GB are free", flush=True)
    if free < need * 1.05:
        raise SystemExit(f"not enough disk: free {need / GB:.0f} GB under {args.workdir} or pass another --workdir.")
    rows = []
    for k in kinds:
        rows.append(case(k, args.workdir, args.layers))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'case':<4} {'grow':<26} {'source GB':>9} {'out GB':>7} {'cp GB/s':>8} {'grow s':>7} {'grow GB/s':>9} "
          f"{'vs cp':>6} {'grow RSS GB':>11} {'verify s':>8} {'verify RSS GB':>13} {'passed':>6}")
    for r in rows:
        cp_tp = r["source_bytes"] / r["cp_seconds"]
        grow_tp = r["out_bytes"] / r["grow_seconds"]
        print(f"{r['kind']:<4} {r['grow']:<26} {r['source_bytes'] / GB:>9.1f} {r['out_bytes'] / GB:>7.1f} "
              f"{cp_tp / GB:>8.2f} {r['grow_seconds']:>7.0f} {grow_tp / GB:>9.2f} {grow_tp / cp_tp:>6.0%} "
              f"{r['grow_rss'] / GB:>11.2f} {r['verify_seconds']:>8.0f} {r['verify_rss'] / GB:>13.2f} {str(r['passed']):>6}")
    for r in rows:
        print(f"{r['kind']}: verify rel_error {r['rel_error']:.3g} (exact expected: {r['exact']}), runs in bf16: "
              f"{r['dtype_check']}, most parameter bytes in memory at once {r['peak_layer_bytes'] / GB:.2f} GB")
        ok = max(r["grow_rss"], r["verify_rss"]) < 3 * GB
        print(f"goal: peak RSS of grow and verify under 3 GB: {'met' if ok else 'MISSED'}")


def _source_bytes(cfg: dict) -> int:
    return sum(2 * (s[0] * (s[1] if len(s) > 1 else 1)) for _, s in llama_shapes(cfg))


if __name__ == "__main__":
    main()
