"""Tiny random models of every supported architecture, saved the way transformers / timm save them.

Every parameter is randomised (norm weights around 1, biases non-zero) so that a wrong scale or a
missed tensor shows up in the outputs instead of hiding behind a default initialisation."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 160


def _randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    # LayerNorms named by position only (timm ConvNeXt's stem.1, downsample.0)
    norms = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm) for p in ("weight", "bias")}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name.lower() or "ln_" in name or name in norms:
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
    if kind == "gemma":  # head_dim 12 with hidden 32 / 4 heads; tied by default
        return tf.GemmaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=12, pad_token_id=0, **common)
    if kind == "gemma2":  # sandwich norms, soft-capping low enough to bend the scores and logits
        return tf.Gemma2Config(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=12, sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                               query_pre_attn_scalar=12, pad_token_id=0, **common)
    if kind == "gemma3":  # plus q/k norms; layers alternate sliding and full attention
        return tf.Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=12, sliding_window=8, query_pre_attn_scalar=12, pad_token_id=0,
                                   layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=3.0,
                                   **common)
    if kind == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2,
                             pad_token_id=0, bos_token_id=0, eos_token_id=0, **common)
    if kind == "olmo2":  # norms on the branch outputs only; q/k norms over the whole projection
        return tf.Olmo2Config(hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=3,
                              pad_token_id=0, bos_token_id=0, eos_token_id=0, **common)
    if kind == "gpt_neox":  # parallel residual, q|k|v interleaved per head, rotary on a quarter of each head
        return tf.GPTNeoXConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, rotary_pct=0.25,
                                pad_token_id=0, bos_token_id=0, eos_token_id=0, **common)
    if kind == "granite":  # muP-style multipliers away from 1
        return tf.GraniteConfig(hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2,
                                embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                                logits_scaling=4.0, pad_token_id=0, bos_token_id=0, eos_token_id=0, **common)
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                             tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    moe = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, **common)
    if kind == "mixtral":  # every layer sparse, the top-k weights always renormalised
        return tf.MixtralConfig(intermediate_size=40, num_local_experts=4, **moe)
    if kind == "qwen2_moe":  # a shared expert behind its sigmoid gate; layer 1 dense; no renormalisation
        return tf.Qwen2MoeConfig(intermediate_size=56, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                 num_experts=4, mlp_only_layers=[1], **moe)
    if kind == "qwen3_moe":  # head_dim of its own, q/k norms; 3 layers of which (i + 1) % 2 == 0 are sparse
        return tf.Qwen3MoeConfig(intermediate_size=56, moe_intermediate_size=24, num_experts=4, head_dim=16,
                                 decoder_sparse_step=2, norm_topk_prob=True, **dict(moe, num_hidden_layers=3))
    if kind == "olmoe":  # q/k norms over the whole projection, every layer sparse
        return tf.OlmoeConfig(intermediate_size=24, num_experts=4, norm_topk_prob=True, **moe)
    raise ValueError(kind)


LANGUAGE_KINDS = ("llama", "llama_mqa", "mistral", "qwen2", "qwen3", "gpt2")
# Families with quirks of their own (scaled embeddings, (1 + w) and sandwich norms, fused and interleaved
# projections, multipliers); tested by tests/test_families.py.
FAMILY_KINDS = ("gemma", "gemma2", "gemma3", "phi3", "olmo2", "gpt_neox", "granite")
MOE_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")  # mixture-of-experts sources


def save_language_model(kind: str, path: Path, tied: bool = False, seed: int = 0, dtype=torch.float32) -> Path:
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(_config(kind, tied))
    _randomise(model, seed)
    model.to(dtype).save_pretrained(path)
    return path


def moe_block(layer):
    """A decoder layer's FFN block: transformers 4 names Mixtral's block_sparse_moe, transformers 5 mlp."""
    return getattr(layer, "block_sparse_moe", None) or layer.mlp


def loaded_expert(moe, e: int, width: int):
    """Expert e's gate and down projections as the loaded model holds them: transformers 5 fuses the
    experts into one tensor per part, transformers 4 keeps one module per expert."""
    if hasattr(moe.experts, "gate_up_proj"):
        return moe.experts.gate_up_proj[e, :width], moe.experts.down_proj[e]
    expert = moe.experts[e]
    if hasattr(expert, "w1"):  # Mixtral
        return expert.w1.weight, expert.w2.weight
    return expert.gate_proj.weight, expert.down_proj.weight


ENCODER_KINDS = ("bert_mlm", "bert", "roberta_mlm")


def save_encoder(kind: str, path: Path, seed: int = 0, dtype=torch.float32) -> Path:
    """A BERT-style encoder as save_pretrained writes it: BertForMaskedLM, a bare BertModel (with its
    pooler), or RobertaForMaskedLM; post-LN blocks, the MLM decoder tied to the word embeddings."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(seed)
    sizes = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    if kind == "roberta_mlm":  # positions start after the padding index
        model = tf.RobertaForMaskedLM(tf.RobertaConfig(max_position_embeddings=66, **sizes))
    else:
        config = tf.BertConfig(max_position_embeddings=64, **sizes)
        model = tf.BertForMaskedLM(config) if kind == "bert_mlm" else tf.BertModel(config)
    _randomise(model, seed)
    model.to(dtype).save_pretrained(path)
    return path


# timm models as users make them: created by name (sizes from the architecture's registered defaults,
# which save_for_hf leaves out of config.json) with what they override recorded in model_args.
SMALL_IMAGES = {"input_size": (3, 32, 32)}  # what save_for_hf records as the input size: 32 x 32, to stay fast
TIMM_KINDS = {
    "vit_defaults": ("test_vit", {"img_size": 32}),  # 64 wide, 6 blocks, 2 heads, mlp_ratio 3: all defaults
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 2}),  # distillation token, head
    "vit_reg": ("test_vit2", {"img_size": 32}),  # register token, no class token, average pooling, fc_norm, layer scale
    # stages 24/32/48/64 wide and 1/2/4/2 deep: all defaults
    "convnext": ("test_convnext", {"data_config": SMALL_IMAGES}),
    "convnext_args": ("convnext_tiny", {"dims": [16, 24, 32, 40], "depths": [1, 1, 2, 1], "data_config": SMALL_IMAGES}),
}


def save_timm(arch: str, path: Path, seed: int = 0, data_config: dict | None = None, **overrides) -> Path:
    """A timm model created by name with 10 classes (and what `overrides` give), saved with save_for_hf."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=10, **overrides)
    _randomise(model, seed)
    save_for_hf(model, str(path), safe_serialization=True, data_config=data_config)
    return path


def save_vit(path: Path, seed: int = 0, embed_dim: int = 48, num_heads: int = 3, depth: int = 2) -> Path:
    """A ViT whose sizes the user gave to create_model (so model_args records them)."""
    return save_timm("vit_tiny_patch16_224", path, seed, img_size=32, patch_size=8, embed_dim=embed_dim, depth=depth,
                     num_heads=num_heads)
