"""The grow command: every command, --json, --dry-run, exit codes, sharded output."""

import json
import os
import subprocess
import sys

from safetensors import safe_open
from typer.testing import CliRunner

from grow.cli import app

runner = CliRunner()


def grow(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_inspect_json_uses_config_key_names(model_dir):
    r = grow("inspect", model_dir("llama"), "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["hidden_size"] == 72 and info["num_attention_heads"] == 9 and info["num_key_value_heads"] == 3
    assert info["head_dim"] == 8 and info["intermediate_size"] == 112 and info["num_hidden_layers"] == 2
    assert info["tie_word_embeddings"] is False and info["dtype"] == "float32"
    assert info["parameters"] > 0
    gpt2 = json.loads(grow("inspect", model_dir("gpt2", True), "--json").stdout)
    assert gpt2["n_embd"] == 48 and gpt2["n_head"] == 4 and gpt2["tie_word_embeddings"] is True
    vit = json.loads(grow("inspect", model_dir("vit"), "--json").stdout)
    assert vit["architecture"].startswith("vit_") and vit["embed_dim"] == 48 and vit["num_heads"] == 3


def test_inspect_table(model_dir):
    r = grow("inspect", model_dir("qwen3"))
    assert r.exit_code == 0 and "Qwen3ForCausalLM" in r.stdout and "head_dim" in r.stdout


def test_dry_run_writes_nothing(model_dir, tmp_path):
    dst = tmp_path / "out"
    r = grow("expand", model_dir("qwen2"), dst, "--factor", "2", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)["plan"]
    assert not dst.exists()
    assert plan["target_sizes"]["hidden"] == 128 and plan["source_sizes"]["hidden"] == 64
    names = {t["name"] for t in plan["tensors"]}
    assert "model.layers.1.self_attn.q_proj.bias" in names
    q = next(t for t in plan["tensors"] if t["name"] == "model.layers.0.self_attn.q_proj.weight")
    assert q["shape"] == [128, 128] and "element-wise split" in q["recipe"]
    table = grow("expand", model_dir("qwen2"), dst, "--factor", "2", "--dry-run")
    assert table.exit_code == 0 and "q_proj" in table.stdout and not dst.exists()


def test_expand_verify_json_and_shards(model_dir, tmp_path):
    dst = tmp_path / "out"
    r = grow("expand", model_dir("mistral"), dst, "--factor", "2", "--shard-size", "200KB", "--verify", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["verification"]["passed"] and result["verification"]["rel_error"] < 1e-4
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == result["files"]
    for shard in shards:  # every shard within the limit unless it holds one tensor larger than it
        with safe_open(str(dst / shard), "pt") as f:
            assert (dst / shard).stat().st_size <= 200_000 + 4096 or len(list(f.keys())) == 1
    assert not (dst / "model.safetensors").exists()
    assert (dst / "grow.json").is_file() and (dst / "README.md").is_file()
    # verify as its own command, JSON and table
    v = grow("verify", model_dir("mistral"), dst, "--json")
    assert v.exit_code == 0 and json.loads(v.stdout)["top1_agreement"] == 1.0
    assert grow("verify", model_dir("mistral"), dst).exit_code == 0


def test_verify_fails_on_tampered_output(model_dir, tmp_path):
    dst = tmp_path / "out"
    assert grow("expand", model_dir("llama"), dst, "--factor", "2").exit_code == 0
    path = dst / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.1.mlp.down_proj.weight"][0, :5] += 0.5
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    r = grow("verify", model_dir("llama"), dst, "--json")
    assert r.exit_code == 3
    report = json.loads(r.stdout)
    assert report["passed"] is False and report["rel_error"] > 1e-4


def test_expand_verify_flag_exits_3_when_tolerance_cannot_be_met(model_dir, tmp_path):
    r = grow("expand", model_dir("llama"), tmp_path / "out", "--factor", "2", "--verify", "--tol", "0")
    assert r.exit_code == 3


def test_console_script_and_module_entry(model_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "grow", "inspect", str(model_dir("llama")), "--json"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["hidden_size"] == 72
    assert r.stderr == ""  # nothing on stderr when it is not a terminal


def test_verify_refuses_models_that_cannot_be_compared(model_dir, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(model_dir("llama"), other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] = 200  # the weights no longer fit: transformers refuses to load it
    (other / "config.json").write_text(json.dumps(cfg))
    r = grow("verify", model_dir("llama"), other)
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "cannot load" in r.stderr
    assert "Traceback" not in r.output
    import transformers as tf

    wider_vocab = tmp_path / "vocab200"
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       vocab_size=200)).save_pretrained(wider_vocab)
    r = grow("verify", model_dir("llama"), wider_vocab)
    assert r.exit_code == 1 and "cannot be compared" in r.stderr and "Traceback" not in r.output
    r = grow("verify", model_dir("vit"), model_dir("vit"), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["rel_error"] == 0.0
