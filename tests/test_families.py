"""The decoder families with quirks of their own (tests/tiny_models.py FAMILY_KINDS): every exact method is
exact through grow verify, every output loads in transformers with no missing or unexpected tensors, and
what cannot apply is refused with exit 2 and the reason."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import grow
from grow.cli import app

EXACT = [
    # Gemma: sqrt(hidden) embeddings, (1 + w) norms, tied head; Gemma 2/3: sandwich norms, soft-capping
    ("gemma", True, "hypercloning", dict(factor=2, noise_snr_db=20.0)),
    ("gemma2", True, "hypercloning", dict(factor=3)),
    ("gemma3", True, "hypercloning", dict(factor=2, ffn_factor=3)),
    ("gemma3", False, "hypercloning", dict(factor=2)),
    ("gemma", True, "lemon", dict(hidden=44, ffn=60, layers=3)),  # hidden not a multiple
    ("gemma2", True, "lemon", dict(hidden=44, layers=3)),
    ("gemma3", True, "lemon", dict(hidden=48, heads=6, ffn=60, layers=3)),
    ("gemma2", True, "msg", dict(hidden=48, ffn=60, heads=6, layers=3)),
    ("gemma3", True, "msg", dict(hidden=44, layers=3)),
    # Phi-3: fused qkv_proj and gate_up_proj
    ("phi3", False, "hypercloning", dict(factor=2, noise_snr_db=20.0)),
    ("phi3", False, "lemon", dict(hidden=72, ffn=80, layers=3)),
    ("phi3", False, "msg", dict(hidden=72, ffn=80, layers=3)),
    # OLMo-2: branches read the residual itself, post-norms, q/k norms over the whole projection
    ("olmo2", False, "hypercloning", dict(factor=2)),
    ("olmo2", False, "lemon", dict(hidden=96, ffn=80, layers=3)),
    ("olmo2", False, "lemon", dict(hidden=64, ffn=80, layers=3)),  # 6 -> 8 heads: one copy plus 2 new heads
    ("olmo2", False, "msg", dict(hidden=64, ffn=80, layers=3)),  # heads 6 -> 8 under the whole-projection norms
    # GPT-NeoX: parallel residual, q|k|v interleaved per head, partial rotary, LayerNorm, untied head
    ("gpt_neox", False, "hypercloning", dict(factor=3)),
    ("gpt_neox", False, "lemon", dict(hidden=60, ffn=120, layers=3)),
    ("gpt_neox", False, "msg", dict(hidden=60, ffn=120, layers=3)),
    # Granite: embedding, residual, attention and logit multipliers
    ("granite", False, "hypercloning", dict(factor=2)),
    ("granite", False, "lemon", dict(hidden=60, ffn=80, layers=3)),
    ("granite", False, "msg", dict(hidden=60, ffn=80, heads=9, layers=3)),
]

LOSSY = [
    ("gemma3", True, "expand", "stack", dict(layers=3)),
    ("olmo2", False, "expand", "stack", dict(layers=4)),
    ("gemma2", True, "shrink", "select", dict(hidden=24, ffn=32, heads=2, layers=1)),
    ("phi3", False, "shrink", "select", dict(hidden=32, ffn=32, heads=4, layers=1)),
    ("gpt_neox", False, "shrink", "select", dict(hidden=24, ffn=32, heads=2, layers=1)),
    ("gemma", True, "shrink", "subclone", dict(hidden=24, ffn=32, heads=2, layers=1)),
    ("olmo2", False, "shrink", "subclone", dict(hidden=24, ffn=32, heads=3, layers=1)),
    ("gpt_neox", False, "shrink", "subclone", dict(hidden=24, ffn=32, heads=2, layers=1)),
    ("granite", False, "shrink", "subclone", dict(hidden=32, ffn=32, heads=4, layers=1)),
]


def assert_loads_cleanly(path):
    """transformers loads every tensor of the folder and finds none missing."""
    import transformers

    _, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.parametrize("kind,tied,method,options", EXACT)
def test_exact_methods_are_exact(model_dir, tmp_path, kind, tied, method, options):
    dst = tmp_path / "out"
    report = grow.expand(model_dir(kind, tied), dst, method=method, verify=True, ramp_steps=10, **options) \
        if method == "msg" else grow.expand(model_dir(kind, tied), dst, method=method, verify=True, **options)
    report = report["verification"]
    assert report["exact_expected"] and report["passed"] and report["rel_error"] <= 1e-4, report
    assert report["top1_agreement"] == 1.0
    assert_loads_cleanly(dst)


@pytest.mark.parametrize("kind,tied,operation,method,options", LOSSY)
def test_lossy_methods_load_and_keep_the_layer_pattern(model_dir, tmp_path, kind, tied, operation, method, options):
    dst = tmp_path / "out"
    run = grow.expand if operation == "expand" else grow.shrink
    report = run(model_dir(kind, tied), dst, method=method, verify=True, **options)["verification"]
    assert report["exact_expected"] is False and report["passed"]
    assert_loads_cleanly(dst)
    cfg = json.loads((dst / "config.json").read_text())
    if "layer_types" in cfg:
        assert len(cfg["layer_types"]) == cfg["num_hidden_layers"]


def test_gemma_hypercloning_folds_the_embedding_scale_into_the_tied_norm(model_dir, tmp_path):
    """Gemma multiplies embeddings by sqrt(hidden): the tiled embedding is divided by sqrt(n), and the tied
    head's missing 1/sqrt(n) goes into the final norm, applied to (1 + w), not to w."""
    src, dst = model_dir("gemma2", True), tmp_path / "out"
    grow.expand(src, dst, factor=4)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    emb = a["model.embed_tokens.weight"]
    torch.testing.assert_close(b["model.embed_tokens.weight"], emb.repeat(1, 4) / 2)
    torch.testing.assert_close(1 + b["model.norm.weight"], (1 + a["model.norm.weight"]).repeat(4) / 2)
    assert "lm_head.weight" not in b
    # sandwich and pre norms are tiled as they are
    torch.testing.assert_close(b["model.layers.0.post_attention_layernorm.weight"],
                               a["model.layers.0.post_attention_layernorm.weight"].repeat(4))


def test_lemon_new_layer_zeroes_the_output_norm_of_a_post_normed_branch(model_dir, tmp_path):
    """In a branch whose output is normalised, a new layer writes nothing because that norm's weight
    is 0 (stored -1 for a (1 + w) norm); what it normalises stays a copy, so its gradient stays finite."""
    src, dst = model_dir("gemma2", True), tmp_path / "out"
    grow.expand(src, dst, method="lemon", layers=3)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    new = "model.layers.2"  # inserted after source layer 1
    for norm in ("post_attention_layernorm", "post_feedforward_layernorm"):
        assert torch.equal(b[f"{new}.{norm}.weight"], torch.full((32,), -1.0))
    assert torch.equal(b[f"{new}.self_attn.o_proj.weight"], a["model.layers.1.self_attn.o_proj.weight"])
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "full_attention"]


def test_layer_types_left_out_of_the_config_follow_the_source_layers(tmp_path):
    """A Gemma 3 config with only sliding_window_pattern (as on the Hub): the grown config lists each layer's
    attention as its source layer had it, not the pattern recounted for the new depth."""
    from tiny_models import save_language_model

    src = save_language_model("gemma3", tmp_path / "src", tied=True)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["layer_types"]
    cfg["sliding_window_pattern"] = 2
    (src / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "out"
    report = grow.expand(src, dst, method="lemon", layers=4, verify=True)["verification"]
    assert report["passed"] and report["rel_error"] <= 1e-4
    layer_types = json.loads((dst / "config.json").read_text())["layer_types"]
    assert layer_types == ["sliding_attention", "sliding_attention", "full_attention", "full_attention"]


def test_pythia_head_name_is_kept(model_dir, tmp_path):
    """Pythia checkpoints call the head embed_out: the output keeps the name and transformers loads it."""
    src = model_dir("gpt_neox")
    weights = load_file(str(src / "model.safetensors"))
    assert "embed_out.weight" in weights
    dst = tmp_path / "out"
    report = grow.expand(src, dst, factor=2, verify=True)["verification"]
    assert report["passed"] and report["layer_by_layer"]  # transformers 5's lm_head is read from embed_out
    assert "embed_out.weight" in load_file(str(dst / "model.safetensors"))
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 reads a GPT-NeoX head only as embed_out, so an lm_head-named source does not load")
    renamed = tmp_path / "lm_head_named"
    renamed.mkdir()
    (renamed / "config.json").write_text((src / "config.json").read_text())
    weights["lm_head.weight"] = weights.pop("embed_out.weight")
    save_file(weights, str(renamed / "model.safetensors"), metadata={"format": "pt"})
    report = grow.expand(renamed, tmp_path / "out2", factor=2, verify=True)["verification"]
    assert report["passed"] and report["rel_error"] <= 1e-4


def test_bf16_gemma_grows_and_runs_in_bf16(tmp_path):
    """As users run it: a bf16 Gemma grown by HyperCloning (factor 4: powers of two, exact in bf16) runs
    in bf16 and predicts what the source predicts."""
    import transformers

    from tiny_models import save_language_model

    src = save_language_model("gemma3", tmp_path / "src", tied=True, dtype=torch.bfloat16)
    dst = tmp_path / "out"
    grow.expand(src, dst, factor=4)
    ids = torch.randint(0, 160, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = [transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.bfloat16)(ids).logits
              for p in (src, dst)]
    assert logits[1].dtype == torch.bfloat16 and torch.isfinite(logits[1]).all()
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("kind", ["gemma", "gemma3", "phi3", "olmo2", "gpt_neox", "granite"])
def test_upcycle_refuses_families_without_a_moe_architecture(model_dir, tmp_path, kind):
    result = CliRunner().invoke(app, ["upcycle", str(model_dir(kind)), str(tmp_path / "moe"), "--experts", "4",
                                      "--top-k", "2"])
    assert result.exit_code == 2, result.output
    assert "ForCausalLM" in result.output and not (tmp_path / "moe").exists()


def test_lemon_uneven_heads_under_whole_projection_norms(model_dir, tmp_path):
    """OLMo-2, 6 -> 8 heads: one whole copy of every head plus new heads whose queries and keys are 0 and
    whose output columns are 0; q_proj carries sqrt(8/6) so the whole-projection norm sees the same mean
    square, and the norm's weight 1/sqrt(8/6)."""
    src, dst = model_dir("olmo2"), tmp_path / "out"
    grow.expand(src, dst, method="lemon", hidden=64)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    q, hd = b["model.layers.0.self_attn.q_proj.weight"], 8
    assert torch.equal(q[6 * hd:], torch.zeros_like(q[6 * hd:]))
    assert torch.equal(b["model.layers.0.self_attn.k_proj.weight"][3 * hd:], torch.zeros(1 * hd, 64))
    assert torch.equal(b["model.layers.0.self_attn.o_proj.weight"][:, 6 * hd:], torch.zeros(64, 2 * hd))
    torch.testing.assert_close(b["model.layers.0.self_attn.q_norm.weight"][:6 * hd],
                               a["model.layers.0.self_attn.q_norm.weight"] * (6 / 8) ** 0.5)
