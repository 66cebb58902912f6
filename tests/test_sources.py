"""Sources: a hub id resolved through the huggingface_hub cache (offline), sharded inputs, timm folders."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import grow


def _hub_cache(tmp_path, model: str, folder):
    """Lay out a Hugging Face hub cache holding `folder` as revision main of repo `model`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / ("models--" + model.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return tmp_path / "hub"


def _cli(args, cache, **env):
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "grow", *map(str, args)], capture_output=True, text=True, env=env)


def test_hub_id_from_cache(model_dir, tmp_path):
    cache = _hub_cache(tmp_path, "tiny-org/tiny-llama", model_dir("llama"))
    r = _cli(["inspect", "tiny-org/tiny-llama", "--json"], cache)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["hidden_size"] == 72
    out = tmp_path / "out"
    r = _cli(["expand", "tiny-org/tiny-llama", out, "--factor", "2", "--json"], cache)
    assert r.returncode == 0, r.stderr
    recipe = json.loads((out / "grow.json").read_text())
    assert recipe["source"]["id"] == "tiny-org/tiny-llama"
    r = _cli(["verify", "tiny-org/tiny-llama", out, "--json"], cache)
    assert r.returncode == 0 and json.loads(r.stdout)["passed"], r.stderr


def test_hub_id_not_cached_offline(tmp_path):
    r = _cli(["inspect", "nobody/nothing"], tmp_path / "empty")
    assert r.returncode == 1
    assert r.stderr.startswith("error:") and "nobody/nothing" in r.stderr and "cache" in r.stderr


def test_sharded_source_and_output_reload(model_dir, tmp_path):
    import transformers

    sharded = tmp_path / "sharded"
    grow.expand(model_dir("qwen3", True), sharded, factor=2, shard_size="150KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(sharded)
    assert model.config.hidden_size == 96 and model.config.tie_word_embeddings
    again = tmp_path / "again"
    result = grow.expand(sharded, again, factor=2, verify=True)
    assert result["verification"]["passed"]
    hashed = json.loads((again / "grow.json").read_text())["source"]["files"]
    shards = set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert set(hashed) == {"config.json", "model.safetensors.index.json", *shards}
    assert all(len(h) == 64 for h in hashed.values())


@pytest.mark.no_transformers
def test_timm_output_is_one_file_and_loads(model_dir, tmp_path):
    import timm

    out = tmp_path / "vit"
    grow.expand(model_dir("vit"), out, factor=2, shard_size="10KB")
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.embed_dim == 96 and model.blocks[0].attn.num_heads == 6


def test_companion_files_are_copied(model_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(model_dir("llama"), src)
    (src / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    out = tmp_path / "out"
    grow.expand(src, out, factor=2)
    assert json.loads((out / "generation_config.json").read_text()) == {"max_new_tokens": 7}
    assert (out / "tokenizer_config.json").is_file()


def _rewrite(folder, rename, extra=None):
    """Re-save a checkpoint with renamed tensors (and extra buffers), the way older exports look."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_original_gpt2_names_and_old_buffers(model_dir, tmp_path):
    import torch

    src = tmp_path / "gpt2"
    shutil.copytree(model_dir("gpt2", True), src)
    _rewrite(src, lambda k: k.removeprefix("transformer."),
             {"h.0.attn.bias": torch.ones(1, 1, 64, 64), "h.1.attn.bias": torch.ones(1, 1, 64, 64)})
    out = tmp_path / "out"
    result = grow.expand(src, out, factor=2, verify=True)
    assert result["verification"]["passed"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "wte.weight" in names and "h.0.attn.c_attn.weight" in names and "h.0.attn.bias" not in names
    # operators that reach into the model's modules (MSG masks, subcloning's calibration) find them too
    msg = grow.expand(src, tmp_path / "msg", method="msg", ffn=256, layers=3, verify=True)
    assert msg["verification"]["passed"] and msg["verification"]["rel_error"] <= 1e-4
    masks = json.loads((tmp_path / "msg" / "msg_masks.json").read_text())
    assert all(m.startswith("transformer.") for g in masks["growths"] for m in g["modules"])
    shrunk = grow.shrink(src, tmp_path / "sub", method="subclone", ffn=96, calibration_tokens=128, verify=True)
    assert shrunk["verification"]["passed"]


def test_llama_with_saved_rotary_buffers(model_dir, tmp_path):
    import torch

    src = tmp_path / "llama"
    shutil.copytree(model_dir("llama"), src)
    _rewrite(src, lambda k: k, {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(2)})
    assert grow.expand(src, tmp_path / "out", factor=2, verify=True)["verification"]["passed"]
