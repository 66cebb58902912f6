"""make demo: build a small Llama once (cached), grow it 2x with HyperCloning, verify it, print a table."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table

import grow
from grow.api import peak_rss_bytes

CACHE = Path(".cache/demo")


def small_llama(path: Path) -> Path:
    """A Llama-architecture model (hidden 256, 4 layers, 8 heads over 4 kv heads), random weights."""
    if not (path / "config.json").exists():
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                                       num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg)
        with torch.no_grad():  # spread the norm weights so that a wrong fold could not hide behind ones
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.to(torch.bfloat16).save_pretrained(tmp)
        tmp.rename(path)
    return path


def main() -> None:
    src = small_llama(CACHE / "llama-small")
    dst = CACHE / "llama-small-x2"
    start = time.perf_counter()
    result = grow.expand(src, dst, method="hypercloning", factor=2, dtype="float32", force=True, verify=True)
    seconds = time.perf_counter() - start
    v = result["verification"]
    console = Console()
    console.print("grow expand --method hypercloning --factor 2 --verify", style="bold")
    table = Table()
    table.add_column("")
    table.add_column("value", justify="right")
    for k, val in [
        ("source parameters", f"{result['source_parameters']:,}"),
        ("target parameters", f"{result['target_parameters']:,}"),
        ("max |delta logits|", f"{v['max_abs_diff']:.3g}"),
        ("relative error", f"{v['rel_error']:.3g}"),
        ("top-1 agreement", f"{v['top1_agreement']:.0%}"),
        ("KL(source || target)", f"{v['kl']:.3g}"),
        ("expand time (s)", f"{result['seconds']:.2f}"),
        ("expand + verify time (s)", f"{seconds:.2f}"),
        ("peak memory (MB)", f"{peak_rss_bytes() / 1e6:.0f}"),
        ("exact (rel. error <= 1e-4)", "yes" if v["passed"] else "NO"),
    ]:
        table.add_row(k, val)
    console.print(table)
    print(f"output: {dst}")
    if not v["passed"]:
        raise SystemExit(3)


if __name__ == "__main__":
    main()
