"""Small models actually trained on the Python standard library, with a BPE tokenizer saved beside them.

Used by scripts/shrink_report.py and by the shrink training-evidence test (tests/conftest.py puts scripts/ on the path): a shrinking method only
promises a better starting point for training, and that can only be shown on a model that knows
something. Everything is deterministic (fixed files, seeds, batches)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from grow.training import (HELD_OUT_FILES, STDLIB, Shape, adamw, encode, held_out_windows, llama_config, step,
                           train_tokenizer)
from grow.training import loss as _loss


@dataclass(frozen=True)
class Setup(Shape):
    steps: int = 300  # training of the source
    lr: float = 3e-3
    train_chars: int = 1_500_000


TEST = Setup()
REPORT = Setup(hidden=128, layers=6, heads=8, kv_heads=4, ffn=384, vocab=1024, seq=128, batch=16, steps=600,
               train_chars=3_000_000)


def train_files(chars: int) -> list[Path]:
    out, total = [], 0
    for p in sorted(STDLIB.glob("*.py")):
        if p.name in HELD_OUT_FILES:
            continue
        out.append(p)
        total += p.stat().st_size
        if total >= chars:
            break
    return out


def batches(stream: torch.Tensor, setup: Setup, steps: int, seed: int):
    """The same `steps` batches of random windows for every model trained with this seed."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, stream.numel() - setup.seq, (setup.batch,), generator=gen)
        yield torch.stack([stream[s: s + setup.seq] for s in starts.tolist()])


def train(model, stream: torch.Tensor, setup: Setup, steps: int, seed: int, lr: float | None = None) -> None:
    """AdamW, linear warmup then cosine decay; the same schedule and batches for every model."""
    lr = lr or setup.lr
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits, and slows badly on a busy machine
    try:
        _train(model, stream, setup, steps, seed, lr)
    finally:
        torch.set_num_threads(threads)


def _train(model, stream: torch.Tensor, setup: Setup, steps: int, seed: int, lr: float) -> None:
    model.train()
    opt, sched = adamw(model, lr, steps, steps // 10)
    for ids in batches(stream, setup, steps, seed):
        step(model, opt, sched, ids)
    model.eval()


def held_out(tokenizer, setup: Setup) -> torch.Tensor:
    return held_out_windows(tokenizer, setup.seq)


def loss(model, windows: torch.Tensor) -> float:
    return _loss(model, windows, batch=len(windows))


def build_trained(folder: Path, setup: Setup = TEST, seed: int = 0) -> Path:
    """Train a Llama-shaped model (grouped-query attention) on stdlib text and save it with its tokenizer."""
    import transformers

    transformers.logging.set_verbosity_error()
    folder.mkdir(parents=True, exist_ok=True)
    files = train_files(setup.train_chars)
    tok = train_tokenizer(folder, files, setup.vocab)
    stream = encode(tok, files)
    cfg = llama_config(setup, tok)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    train(model, stream, setup, setup.steps, seed)
    model.save_pretrained(str(folder))
    return folder


def training_stream(folder: Path, setup: Setup = TEST) -> torch.Tensor:
    from transformers import AutoTokenizer

    return encode(AutoTokenizer.from_pretrained(str(folder)), train_files(setup.train_chars))
