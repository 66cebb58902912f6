"""MoE upcycling: every format, granularities 1/2/4, shared expert, tied sources and partial sparse
layers reproduce the dense source in transformers; lossy settings say so; bad options exit 2."""

import json

import pytest
import torch
from typer.testing import CliRunner

import grow
from grow.checkpoint import Source
from grow.cli import app
from tiny_models import loaded_expert, moe_block

# kind, tied, format (None: the default), experts, top_k, granularity, shared expert, moe_layers
EXACT = [
    ("llama", False, None, 4, 2, 1, False, "all"),
    ("llama", True, None, 8, 4, 2, False, "all"),
    ("mistral", False, None, 8, 4, 4, False, "all"),
    ("llama_mqa", False, None, 4, 4, 4, False, "all"),
    ("qwen2", False, None, 4, 2, 1, True, "all"),
    ("qwen2", False, None, 6, 2, 2, False, "1"),
    ("qwen2", True, None, 4, 2, 2, True, "all"),
    ("qwen3", True, None, 8, 4, 4, False, "all"),
    ("qwen3", False, None, 4, 2, 2, False, "every-2"),
    ("llama", True, "qwen2_moe", 4, 2, 1, True, "0"),
    ("mistral", False, "qwen2_moe", 6, 4, 2, False, "all"),
]
EXPERT_NAMES = {
    "mixtral": "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight",
    "qwen2_moe": "model.layers.{i}.mlp.experts.{e}.{w}.weight",
    "qwen3_moe": "model.layers.{i}.mlp.experts.{e}.{w}.weight",
}
PART_NAMES = {"mixtral": ("w1", "w3", "w2")}


def _tensors(folder):
    source = Source(folder)
    return {name: source.get(name) for name in source.tensors}


@pytest.mark.parametrize("kind,tied,fmt,E,k,G,shared,layers", EXACT)
def test_upcycle_is_exact_and_loads(model_dir, tmp_path, kind, tied, fmt, E, k, G, shared, layers):
    src, dst = model_dir(kind, tied), tmp_path / "moe"
    if kind == "mistral" and fmt == "qwen2_moe":  # Qwen2-MoE cannot window every layer: use a copy without one
        src = _without_sliding_window(src, tmp_path / "mistral_nowindow")
    shards = "60KB" if tied else "5GB"  # tied cases also check that sharded per-expert tensors load
    result = grow.upcycle(src, dst, experts=E, top_k=k, granularity=G, shared_expert=shared, format=fmt,
                          moe_layers=layers, shard_size=shards, verify=True)
    report = result["verification"]
    assert report["exact_expected"] is True and report["passed"], report
    assert report["rel_error"] <= 1e-4 and report["top1_agreement"] == 1.0
    assert report["layer_by_layer"]  # never the whole MoE in memory, whatever transformers' expert layout

    recipe = json.loads((dst / "grow.json").read_text())
    assert (dst / "README.md").read_text().startswith(f"# {result['plan']['architecture']}, upcycled with grow")
    out_fmt = recipe["stats"]["format"]
    assert recipe["operation"] == "upcycle" and recipe["exact"] is True
    assert recipe["options"]["experts"] == E and recipe["options"]["granularity"] == G
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied and cfg["torch_dtype"] == "float32" and "rope_theta" in cfg
    assert cfg["num_experts_per_tok"] == k
    assert cfg["num_local_experts" if out_fmt == "mixtral" else "num_experts"] == E
    if out_fmt != "mixtral":
        assert cfg["norm_topk_prob"] is True
    sparse = recipe["stats"]["moe_layers"]
    info = grow.inspect(dst)  # grow reads its own output back, every tensor checked against the config
    assert info["architecture"] == result["plan"]["architecture"] and info["parameters"] == result["target_parameters"]
    assert info["num_local_experts" if out_fmt == "mixtral" else "num_experts"] == E

    # transformers loads every per-expert tensor grow wrote: nothing missing, nothing left over
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    written, dense = _tensors(dst), _tensors(src)
    assert ("lm_head.weight" in written) is not tied
    assert (dst / "model.safetensors.index.json").is_file() is tied
    width = cfg["intermediate_size" if out_fmt == "mixtral" else "moe_intermediate_size"]
    gate_name, _, down_name = PART_NAMES.get(out_fmt, ("gate_proj", "up_proj", "down_proj"))
    i, e = sparse[-1], E - 1
    offset = (e % G + (1 if shared else 0)) * width
    gate = written[EXPERT_NAMES[out_fmt].format(i=i, e=e, w=gate_name)]
    down = written[EXPERT_NAMES[out_fmt].format(i=i, e=e, w=down_name)]
    assert torch.equal(gate, dense[f"model.layers.{i}.mlp.gate_proj.weight"][offset:offset + width])
    assert torch.equal(down, G * dense[f"model.layers.{i}.mlp.down_proj.weight"][:, offset:offset + width])
    moe = moe_block(model.model.layers[i])
    loaded_gate, loaded_down = loaded_expert(moe, e, width)
    assert torch.equal(loaded_gate, gate) and torch.equal(loaded_down, down)
    router = moe.gate.weight
    assert torch.equal(router[::G], router[G - 1::G])  # a group shares one row
    assert torch.equal(router[0], router[-1]) is (E == G)
    for j in range(cfg["num_hidden_layers"]):
        assert hasattr(moe_block(model.model.layers[j]), "experts") is (j in sparse)
    if shared:
        assert torch.equal(moe.shared_expert_gate.weight, torch.zeros_like(moe.shared_expert_gate.weight))
        assert torch.equal(moe.shared_expert.down_proj.weight, 2 * dense[f"model.layers.{i}.mlp.down_proj.weight"][:, :width])


def _without_sliding_window(src, folder):
    import shutil

    shutil.copytree(src, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["sliding_window"] = None
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("options,why", [
    (dict(format="qwen3_moe", renormalize=False), "does not renormalise"),
    (dict(expert_noise=0.05), "independent noise"),
    (dict(router="zero"), "breaks ties"),
])
def test_lossy_settings_say_so_and_verify_reports(model_dir, tmp_path, options, why):
    src = model_dir("qwen3")
    plan = grow.upcycle(src, experts=4, top_k=2, granularity=2, dry_run=True, **options)["plan"]
    assert plan["exact"] is False and any(why in n for n in plan["notes"])
    dst = tmp_path / "moe"
    report = grow.upcycle(src, dst, experts=4, top_k=2, granularity=2, verify=True, **options)["verification"]
    recipe = json.loads((dst / "grow.json").read_text())
    assert recipe["exact"] is False and any(why in n for n in recipe["notes"])
    assert report["exact_expected"] is False and report["passed"] is True
    assert report["rel_error"] < report["baseline_random_init"]["rel_error"]
    if "router" not in options:  # these change the function for real; a zero router only loses the guarantee
        assert report["rel_error"] > 1e-4
    if "expert_noise" in options:  # noise of the asked size, independent per expert
        written, dense = _tensors(dst), _tensors(src)
        clean = dense["model.layers.0.mlp.up_proj.weight"][:48]
        a, b = (written[f"model.layers.0.mlp.experts.{x}.up_proj.weight"] for x in (0, 2))  # both hold shard 0
        for w in (a, b):
            assert abs(((w - clean).pow(2).mean() / clean.pow(2).mean()).sqrt().item() - 0.05) < 0.01
        assert not torch.allclose(a, b)


def test_zero_router_plain_copies_are_exact(model_dir, tmp_path):
    report = grow.upcycle(model_dir("qwen2", True), tmp_path / "moe", experts=4, top_k=1, router="zero",
                          verify=True)["verification"]
    assert report["exact_expected"] is True and report["passed"] and report["rel_error"] <= 1e-4
    # an MoE is not upcycled again: the operators with no rule for experts refuse it instead of misreading it
    res = CliRunner().invoke(app, ["upcycle", str(tmp_path / "moe"), str(tmp_path / "again"), "--experts", "2", "--top-k", "1"])
    assert res.exit_code == 2, res.output
    assert "grow cannot upcycle a Qwen2MoeForCausalLM checkpoint with --method moe" in " ".join(res.output.split())


def test_dry_run_shows_experts_and_parameters(model_dir):
    runner = CliRunner()
    res = runner.invoke(app, ["upcycle", str(model_dir("llama")), "--experts", "8", "--top-k", "2", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)["plan"]
    stats = plan["stats"]
    assert stats["experts"] == 8 and stats["top_k"] == 2 and stats["format"] == "mixtral"
    s = plan["source_sizes"]
    expert = 3 * s["hidden"] * s["ffn"]
    assert plan["parameters"] - stats["active_parameters_per_token"] == s["layers"] * 6 * expert
    assert plan["parameters"] == grow.inspect(model_dir("llama"))["parameters"] + s["layers"] * (7 * expert + 8 * s["hidden"])
    text = runner.invoke(app, ["upcycle", str(model_dir("llama")), "--experts", "8", "--top-k", "2", "--dry-run"]).output
    assert "active_parameters_per_token" in text and "experts" in text


@pytest.mark.parametrize("kind,args,message", [
    ("llama", ["--experts", "4", "--top-k", "5"], "--top-k 5 exceeds --experts 4"),
    ("llama", ["--experts", "8", "--top-k", "3", "--granularity", "2"], "--top-k 3 is not a multiple of --granularity 2"),
    ("llama", ["--experts", "6", "--top-k", "4", "--granularity", "4"], "--experts 6 is not a multiple of --granularity 4"),
    ("llama", ["--experts", "6", "--top-k", "3", "--granularity", "3"], "FFN width 112 is not divisible by 3"),
    ("llama", ["--experts", "4", "--top-k", "2", "--granularity", "2", "--shared-expert", "--format", "qwen2_moe"],
     "FFN width 112 is not divisible by 3"),
    ("gpt2", ["--experts", "4", "--top-k", "2"], "GPT2LMHeadModel is not one of them"),
    ("llama", ["--experts", "4", "--top-k", "2", "--format", "qwen3_moe"], "cannot hold a LlamaForCausalLM source"),
    ("llama", ["--experts", "4", "--top-k", "2", "--format", "switch"], "--format switch is not one of"),
    ("qwen2", ["--experts", "4", "--top-k", "2", "--format", "mixtral"], "cannot hold a Qwen2ForCausalLM source"),
    ("mistral", ["--experts", "4", "--top-k", "2", "--format", "qwen2_moe"], "Mistral windows every layer"),
    ("llama", ["--experts", "4", "--top-k", "2", "--shared-expert"], "--shared-expert needs a format with a shared expert"),
    ("llama", ["--experts", "4", "--top-k", "2", "--moe-layers", "every-2"], "cannot hold (every layer of it is sparse)"),
    ("qwen3", ["--experts", "4", "--top-k", "2", "--moe-layers", "0,5"], "names layer 5"),
    ("llama", ["--experts", "4", "--top-k", "2", "--no-renormalize"], "always renormalises"),
    ("llama", ["--top-k", "2"], "needs --experts and --top-k"),
])
def test_bad_combinations_exit_2(model_dir, kind, args, message):
    res = CliRunner().invoke(app, ["upcycle", str(model_dir(kind)), *args, "--dry-run"])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())


def test_source_biases_the_format_cannot_hold_are_refused(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                   vocab_size=32, attention_bias=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "biased")
    for fmt in ("mixtral", "qwen2_moe"):
        res = CliRunner().invoke(app, ["upcycle", str(tmp_path / "biased"), "--experts", "2", "--top-k", "1",
                                       "--format", fmt, "--dry-run"])
        assert res.exit_code == 2, res.output
        assert "has no place for tensor model.layers.0.self_attn." in " ".join(res.output.split())


def test_bf16_exact_for_powers_of_two_and_flagged_otherwise(tmp_path):
    from tiny_models import save_language_model

    src = save_language_model("qwen2", tmp_path / "bf16", dtype=torch.bfloat16)
    report = grow.upcycle(src, tmp_path / "g2", experts=4, top_k=2, granularity=2, verify=True)["verification"]
    assert report["exact_expected"] is True and report["passed"] and report["rel_error"] <= 1e-4
    assert json.loads((tmp_path / "g2" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    plan = grow.upcycle(src, experts=6, top_k=3, granularity=3, dry_run=True)["plan"]
    assert plan["exact"] is False and any("round in 16 bits" in n for n in plan["notes"])
    report = grow.upcycle(src, tmp_path / "g3", experts=6, top_k=3, granularity=3, dtype="float32",
                          verify=True)["verification"]
    assert report["exact_expected"] is True and report["passed"] and report["rel_error"] <= 1e-4


def test_inspect_reads_moe_checkpoints_that_transformers_saves(tmp_path):
    import transformers as tf

    common = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                  num_experts_per_tok=1)
    configs = {
        "mixtral": tf.MixtralConfig(intermediate_size=8, num_local_experts=3, **common),
        "qwen2_moe": tf.Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=8, shared_expert_intermediate_size=12,
                                       num_experts=3, mlp_only_layers=[0], **common),
        "qwen3_moe": tf.Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=8, num_experts=3, head_dim=8,
                                       decoder_sparse_step=2, **common),
    }
    for family, cfg in configs.items():
        model = tf.AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(tmp_path / family)
        info = grow.inspect(tmp_path / family)
        assert info["family"] == family and info["parameters"] == sum(p.numel() for p in model.parameters())
        assert info["num_local_experts" if family == "mixtral" else "num_experts"] == 3


def test_inspect_checks_the_expert_count(model_dir, tmp_path):
    from safetensors.torch import save_file

    dst = tmp_path / "moe"
    grow.upcycle(model_dir("llama"), dst, experts=4, top_k=2)
    tensors = _tensors(dst)
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(grow.GrowError, match=r"layer 1 holds experts \[0, 1, 2\] of .*w2.weight, but config.json says there are 4"):
        grow.inspect(dst)
