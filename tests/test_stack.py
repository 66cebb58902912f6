"""G_stack: target layer i is source layer i mod L; per-layer config lists follow; grow verify reports
the divergence and passes, because the method is not exact by design."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

import grow
from conftest import timm_case
from grow.cli import app
from grow.verify import load_model


@pytest.mark.parametrize("kind,tied,layers", [("llama", False, 5), ("gpt2", True, 4), timm_case("vit", False, 4)])
def test_stack_copies_layers_and_reports_divergence(model_dir, tmp_path, kind, tied, layers):
    src, dst = model_dir(kind, tied), tmp_path / "out"
    report = grow.expand(src, dst, method="stack", layers=layers, verify=True)["verification"]
    assert report["passed"] and report["exact_expected"] is False
    assert report["kl"] > 0 and 0 <= report["top1_agreement"] <= 1  # reported, not claimed
    assert "baseline_random_init" in report
    recipe = json.loads((dst / "grow.json").read_text())
    assert recipe["method"] == "stack" and recipe["exact"] is False and recipe["target"]["sizes"]["layers"] == layers
    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    prefix = {"llama": "model.layers.", "gpt2": "transformer.h.", "vit": "blocks."}[kind]
    for name, value in b.items():
        if name.startswith(prefix):
            i, rest = name[len(prefix):].split(".", 1)
            assert torch.equal(value, a[f"{prefix}{int(i) % 2}.{rest}"]), name
        else:
            assert torch.equal(value, a[name]), name


def test_per_layer_config_lists_are_rebuilt(tmp_path):
    src = tmp_path / "src"
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=2, vocab_size=160, use_sliding_window=True, sliding_window=8,
                                      max_window_layers=1, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(src)
    assert json.loads((src / "config.json").read_text())["layer_types"] == ["full_attention", "sliding_attention"]
    dst = tmp_path / "out"
    grow.expand(src, dst, method="stack", layers=5)
    cfg = json.loads((dst / "config.json").read_text())
    expected = ["full_attention", "sliding_attention"] * 2 + ["full_attention"]
    assert cfg["num_hidden_layers"] == 5 and cfg["layer_types"] == expected
    model = load_model(dst, "transformers")
    assert model.config.layer_types == expected and len(model.model.layers) == 5


def test_cli_verify_exits_0_for_stack(model_dir, tmp_path):
    src, dst = model_dir("qwen3"), tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(app, ["expand", str(src), str(dst), "--method", "stack", "--layers", "4"]).exit_code == 0
    result = runner.invoke(app, ["verify", str(src), str(dst), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["exact_expected"] is False


@pytest.mark.parametrize("args,words", [
    ([], "needs --layers"),
    (["--layers", "2"], "larger than the source's 2"),
    (["--layers", "4", "--hidden", "100"], "--hidden does not apply"),
])
def test_bad_stack_options_are_refused(model_dir, tmp_path, args, words):
    result = CliRunner().invoke(app, ["expand", str(model_dir("llama")), str(tmp_path / "out"), "--method", "stack", *args])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
