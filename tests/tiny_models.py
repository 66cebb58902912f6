"""Tiny random models of every supported architecture, saved the way transformers / timm save them.

Every parameter is randomised (norm weights around 1, biases non-zero) so that a wrong scale or a
missed tensor shows up in the outputs instead of hiding behind a default initialisation."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 160


def _randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or "ln_" in name:
                p.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.08 * noise)


def _config(kind: str, tied: bool):
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, tie_word_embeddings=tied, max_position_embeddings=128)
    if kind == "llama":  # 9 query heads over 3 kv heads
        return tf.LlamaConfig(hidden_size=72, intermediate_size=112, num_attention_heads=9, num_key_value_heads=3, **common)
    if kind == "llama_mqa":
        return tf.LlamaConfig(hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=1, **common)
    if kind == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
                                sliding_window=16, **common)
    if kind == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, **common)
    if kind == "qwen3":  # head_dim differs from hidden / heads
        return tf.Qwen3Config(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, **common)
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                             tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    raise ValueError(kind)


LANGUAGE_KINDS = ("llama", "llama_mqa", "mistral", "qwen2", "qwen3", "gpt2")


def save_language_model(kind: str, path: Path, tied: bool = False, seed: int = 0, dtype=torch.float32) -> Path:
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(_config(kind, tied))
    _randomise(model, seed)
    model.to(dtype).save_pretrained(path)
    return path


def save_vit(path: Path, seed: int = 0, embed_dim: int = 48, num_heads: int = 3, depth: int = 2) -> Path:
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=embed_dim, depth=depth, num_heads=num_heads, num_classes=10)
    _randomise(model, seed)
    save_for_hf(model, str(path), safe_serialization=True)
    return path
