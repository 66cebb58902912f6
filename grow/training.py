"""Small models trained for the evidence: the Python standard library as text, a BPE tokenizer, the
AdamW warmup + cosine schedule, and the loss of each objective a spec names (next-token, masked-LM,
image classes), shared by the training-evidence scripts and tests.
Not used by growing itself; `tokenizers` is imported only when a tokenizer is trained."""

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
class Shape:
    """A small Llama with grouped-query attention, and the batches it trains on."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 192
    vocab: int = 512
    seq: int = 64
    batch: int = 16


def llama_config(shape: Shape, tokenizer):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, intermediate_size=shape.ffn,
        max_position_embeddings=max(128, shape.seq), tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def read_texts(files) -> list[str]:
    return [Path(p).read_text(encoding="utf-8", errors="replace") for p in files]


def train_tokenizer(folder: Path, files, vocab: int, masked_lm: bool = False):
    """A byte-level BPE tokenizer trained with the tokenizers library, saved so AutoTokenizer loads it;
    masked_lm adds the mask and padding tokens an encoder trains with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = dict(eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if masked_lm:
        specials.update(pad_token="<pad>", mask_token="<mask>")  # padding id 1, as RoBERTa has it
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(dict.fromkeys(specials.values())),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(read_texts(files), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.save_pretrained(str(folder))
    return fast


def encode(tokenizer, files) -> torch.Tensor:
    ids = []
    for text in read_texts(files):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def held_out_windows(tokenizer, seq: int, count: int = 64) -> torch.Tensor:
    """Held-out windows [n, seq] from files that no model was trained on."""
    stream = encode(tokenizer, [STDLIB / f for f in HELD_OUT_FILES if (STDLIB / f).is_file()])
    n = min(count, stream.numel() // seq)
    return stream[: n * seq].view(n, seq)


def warmup_cosine(steps: int, warmup: int):
    """Learning-rate multiplier per step: linear warmup over `warmup` steps, then cosine decay to 0."""
    warmup = max(1, warmup)
    return lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))


def adamw(model, lr: float, steps: int, warmup: int):
    """The optimizer and schedule every compared model gets."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, warmup))


def objective_loss(model, batch, objective: str = "causal_lm") -> torch.Tensor:
    """The loss a model trains on: `causal_lm` (batch: token ids, next-token loss), `masked_lm`
    (batch: masked inputs and labels, -100 where nothing is masked) or `classes` (batch: images and
    class ids, for a classifier that returns logits)."""
    if objective == "causal_lm":
        return model(batch, labels=batch).loss
    inputs, labels = batch
    if objective == "masked_lm":
        return model(input_ids=inputs, labels=labels).loss
    if objective == "classes":
        return torch.nn.functional.cross_entropy(model(inputs), labels)
    raise ValueError(f"no loss for the objective {objective!r}")


def step(model, opt, sched, batch, objective: str = "causal_lm") -> float:
    """One training step on a batch (see objective_loss), gradients clipped to norm 1."""
    loss = objective_loss(model, batch, objective)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()


def loss(model, windows, batch: int = 32, objective: str = "causal_lm") -> float:
    """Mean loss over held-out examples (nats per token for language models), `batch` at a time:
    `windows` is token ids [n, seq], or for the other objectives a pair of tensors with n rows each."""
    was_training = model.training
    model.eval()
    pair = isinstance(windows, (tuple, list))
    n = len(windows[0]) if pair else len(windows)
    total = 0.0
    with torch.no_grad():
        for a in range(0, n, batch):
            part = tuple(w[a:a + batch] for w in windows) if pair else windows[a:a + batch]
            total += objective_loss(model, part, objective).item() * min(batch, n - a)
    model.train(was_training)
    return total / n
