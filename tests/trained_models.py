"""Small models actually trained on the Python standard library, with a BPE tokenizer saved beside them.

Used by the shrink training-evidence test and by scripts/shrink_report.py: a shrinking method only
promises a better starting point for training, and that can only be shown on a model that knows
something. Everything is deterministic (fixed files, seeds, batches)."""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Never trained on: grow verify's sample text (textwrap.py) and the held-out evaluation text.
HELD_OUT_FILES = ("textwrap.py", "shlex.py", "string.py", "fractions.py", "bisect.py", "heapq.py")


@dataclass(frozen=True)
class Setup:
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 192
    vocab: int = 512
    seq: int = 64
    batch: int = 16
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


def _read(files) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_tokenizer(folder: Path, files: list[Path], vocab: int):
    """A byte-level BPE tokenizer trained with the tokenizers library, saved so AutoTokenizer loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_read(files), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(str(folder))
    return fast


def encode(tokenizer, files) -> torch.Tensor:
    ids = []
    for text in _read(files):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


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
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    for ids in batches(stream, setup, steps, seed):
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


def held_out(tokenizer, setup: Setup) -> torch.Tensor:
    """Held-out windows [n, seq] from files that no model was trained on."""
    stream = encode(tokenizer, [STDLIB / f for f in HELD_OUT_FILES if (STDLIB / f).is_file()])
    n = min(64, stream.numel() // setup.seq)
    return stream[: n * setup.seq].view(n, setup.seq)


def loss(model, windows: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return model(windows, labels=windows).loss.item()


def build_trained(folder: Path, setup: Setup = TEST, seed: int = 0) -> Path:
    """Train a Llama-shaped model (grouped-query attention) on stdlib text and save it with its tokenizer."""
    import transformers

    transformers.logging.set_verbosity_error()
    folder.mkdir(parents=True, exist_ok=True)
    files = train_files(setup.train_chars)
    tok = train_tokenizer(folder, files, setup.vocab)
    stream = encode(tok, files)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=setup.hidden, num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads, num_key_value_heads=setup.kv_heads, intermediate_size=setup.ffn,
        max_position_embeddings=max(128, setup.seq), tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    train(model, stream, setup, setup.steps, seed)
    model.save_pretrained(str(folder))
    return folder


def training_stream(folder: Path, setup: Setup = TEST) -> torch.Tensor:
    from transformers import AutoTokenizer

    return encode(AutoTokenizer.from_pretrained(str(folder)), train_files(setup.train_chars))
