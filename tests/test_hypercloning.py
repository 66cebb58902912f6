"""HyperCloning is exact: every architecture, tied and untied, factors 2 and 3, FFN factor, noise."""

import json

import pytest
import torch

import grow
from conftest import MODEL_KINDS, timm_case
from grow.verify import compare, load_model, run, sample_inputs

CASES = [(k, t, 2, None, None) for k, t in MODEL_KINDS] + [timm_case("vit", False, 2, None, None)] + [
    ("llama", False, 3, 2, None),
    ("qwen2", False, 2, 3, 20.0),
    ("gpt2", True, 3, None, 10.0),
    ("llama", True, 2, None, 15.0),
    timm_case("vit", False, 3, 2, 20.0),
]


@pytest.mark.parametrize("kind,tied,factor,ffn_factor,snr", CASES)
def test_expand_is_exact(model_dir, tmp_path, kind, tied, factor, ffn_factor, snr):
    src = model_dir(kind, tied)
    dst = tmp_path / "out"
    result = grow.expand(src, dst, method="hypercloning", factor=factor, ffn_factor=ffn_factor, noise_snr_db=snr,
                         verify=True)
    report = result["verification"]
    assert report["passed"], report
    assert report["rel_error"] <= 1e-4
    assert report["top1_agreement"] == 1.0
    sizes = grow.inspect(dst)
    before = grow.inspect(src)
    hidden_key = {"gpt2": "n_embd", "vit": "embed_dim"}.get(kind, "hidden_size")
    assert sizes[hidden_key] == before[hidden_key] * factor
    recipe = json.loads((dst / "grow.json").read_text())
    assert recipe["method"] == "hypercloning" and recipe["exact"] is True
    assert set(recipe["source"]["files"]) >= {"config.json", "model.safetensors"}


def test_noise_breaks_symmetry_but_not_function(model_dir, tmp_path):
    src = model_dir("llama")
    plain, noisy = tmp_path / "plain", tmp_path / "noisy"
    grow.expand(src, plain, factor=2, noise=False)
    grow.expand(src, noisy, factor=2, noise_snr_db=10.0)
    a, b = load_model(plain, "transformers"), load_model(noisy, "transformers")
    wa = a.model.layers[0].mlp.up_proj.weight
    wb = b.model.layers[0].mlp.up_proj.weight
    half = wa.shape[1] // 2
    assert torch.equal(wa[:, :half], wa[:, half:])  # plain copies are identical
    assert not torch.allclose(wb[:, :half], wb[:, half:])  # noisy copies differ
    snr = 10 * torch.log10(wa.pow(2).mean() / (wb - wa).pow(2).mean())
    assert abs(snr.item() - 10.0) < 1.5
    x = sample_inputs({}, "transformers", 0, vocab=100)
    assert compare(run(a, x, "transformers"), run(b, x, "transformers"))["rel_error"] < 1e-4


def test_tied_head_stays_tied_and_single_kv_head_stays_single(model_dir, tmp_path):
    dst = tmp_path / "out"
    grow.expand(model_dir("llama", True), dst, factor=2)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    mqa = tmp_path / "mqa"
    grow.expand(model_dir("llama_mqa"), mqa, factor=3, verify=True)
    cfg = json.loads((mqa / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 1 and cfg["num_attention_heads"] == 18
    assert cfg["head_dim"] == 8


def test_bf16_source_and_dtype_option(tmp_path):
    from tiny_models import save_language_model

    src = save_language_model("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    out = tmp_path / "out"
    grow.expand(src, out, factor=2)
    assert grow.inspect(out)["dtype"] == "bfloat16"
    out32 = tmp_path / "out32"
    grow.expand(src, out32, factor=2, dtype="float32", verify=True)
    assert grow.inspect(out32)["dtype"] == "float32"
    assert json.loads((out32 / "config.json").read_text())["torch_dtype"] == "float32"


def test_16_bit_rounding_is_not_claimed_exact(model_dir, tmp_path):
    """Where the output dtype must round what an exact method computes, the plan says so and verify
    reports instead of failing; in float32 the same growth is exact."""
    from tiny_models import save_language_model

    src = save_language_model("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    for method, options in [("hypercloning", {"factor": 3, "noise": False}), ("lemon", {"hidden": 108}),
                            ("lemon", {"hidden": 144, "split": "column"})]:
        plan = grow.expand(src, method=method, dry_run=True, **options)["plan"]
        assert plan["exact"] is False and any("round in 16 bits" in n for n in plan["notes"]), (method, options)
    report = grow.expand(src, tmp_path / "x3", factor=3, noise=False, verify=True)["verification"]
    assert report["exact_expected"] is False and report["passed"] and report["rel_error"] > 1e-4
    assert grow.expand(src, tmp_path / "x3f", factor=3, noise=False, dtype="float32",
                       verify=True)["verification"]["rel_error"] <= 1e-4
    # halving, and the default element-wise split (pieces exact in bf16), round nothing
    for options in [{"factor": 2, "noise": False}, {"factor": 2}, {"factor": 3}, {"factor": 2, "noise_snr_db": 0.0}]:
        assert grow.expand(src, dry_run=True, **options)["plan"]["exact"] is True, options
    assert grow.expand(src, method="lemon", dry_run=True, hidden=144, layers=3)["plan"]["exact"] is True
    narrowed = grow.expand(model_dir("llama"), dry_run=True, factor=2, dtype="bfloat16")["plan"]
    assert narrowed["exact"] is False  # float32 weights written as bfloat16


@pytest.mark.no_transformers
def test_single_head_vit_grows_its_heads(tmp_path):
    from tiny_models import save_vit

    src = save_vit(tmp_path / "vit1", embed_dim=16, num_heads=1)
    result = grow.expand(src, tmp_path / "out", factor=2, verify=True)
    assert result["verification"]["passed"] and result["plan"]["target_sizes"]["heads"] == 2
