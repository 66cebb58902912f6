"""Mixture-of-experts checkpoints as sources: HyperCloning is exact (every expert and the shared expert grow
like the FFN, routers read the residual like any reader), stacking follows the dense/sparse layers, and
weight selection keeps fewer experts with their router rows; methods with no rule for experts exit 2."""

import json

import pytest
import torch
from typer.testing import CliRunner

import grow
from grow.checkpoint import Source
from grow.cli import app
from tiny_models import moe_block


def _tensors(folder):
    source = Source(folder)
    return {name: source.get(name) for name in source.tensors}


def _load(folder):
    """The model as transformers loads it, failing on any missing, unexpected or mismatched tensor."""
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model


def _sparse(model) -> list[bool]:
    return [hasattr(moe_block(layer), "experts") for layer in model.model.layers]


# (expert gate name, expert down name, router name) in a sparse layer
NAMES = {
    "mixtral": ("model.layers.0.block_sparse_moe.experts.{e}.w1.weight", "model.layers.0.block_sparse_moe.experts.{e}.w2.weight",
                "model.layers.0.block_sparse_moe.gate.weight"),
    "qwen2_moe": ("model.layers.0.mlp.experts.{e}.gate_proj.weight", "model.layers.0.mlp.experts.{e}.down_proj.weight",
                  "model.layers.0.mlp.gate.weight"),
    "qwen3_moe": ("model.layers.1.mlp.experts.{e}.gate_proj.weight", "model.layers.1.mlp.experts.{e}.down_proj.weight",
                  "model.layers.1.mlp.gate.weight"),
    "olmoe": ("model.layers.0.mlp.experts.{e}.gate_proj.weight", "model.layers.0.mlp.experts.{e}.down_proj.weight",
              "model.layers.0.mlp.gate.weight"),
}


@pytest.mark.parametrize("kind,tied", [("mixtral", True), ("qwen2_moe", False), ("qwen3_moe", False), ("olmoe", False)])
def test_hypercloning_an_moe_is_exact(model_dir, tmp_path, kind, tied):
    src, dst = model_dir(kind, tied), tmp_path / "wide"
    result = grow.expand(src, dst, method="hypercloning", factor=2, verify=True)
    report = result["verification"]
    assert report["exact_expected"] is True and report["passed"], report
    assert report["rel_error"] <= 1e-4 and report["top1_agreement"] == 1.0
    assert report["layer_by_layer"]  # transformers 5's stacked experts are built from the per-expert tensors
    model = _load(dst)
    assert _sparse(model) == _sparse(_load(src))

    before, after = grow.inspect(src), grow.inspect(dst)
    ffn_keys = [k for k in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size") if k in before]
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", *ffn_keys):
        assert after[key] == 2 * before[key], key
    experts = "num_local_experts" if kind == "mixtral" else "num_experts"
    assert after[experts] == before[experts] and after["head_dim"] == before["head_dim"]

    # every reader of a tiled space reads both copies, its two column halves adding up to the source's columns
    # (split unequally to break the symmetry); outputs of a tiled space are tiled rows
    old, new = _tensors(src), _tensors(dst)
    gate, down, router = NAMES[kind]
    e = before[experts] - 1
    names = [gate.format(e=e), down.format(e=e), router]
    if kind == "qwen2_moe":  # the shared expert's gate reads the residual too
        names.append("model.layers.0.mlp.shared_expert_gate.weight")
    for name in names:
        w, rows = new[name], old[name].shape[0]
        halves = w[:, : w.shape[1] // 2] + w[:, w.shape[1] // 2:]
        for block in range(w.shape[0] // rows):
            assert torch.allclose(halves[block * rows:(block + 1) * rows], old[name], atol=1e-6), name


@pytest.mark.parametrize("kind,layers", [("mixtral", 3), ("qwen3_moe", 4), ("olmoe", 3)])
def test_stack_copies_layers_with_their_experts(model_dir, tmp_path, kind, layers):
    src, dst = model_dir(kind), tmp_path / "deep"
    report = grow.expand(src, dst, method="stack", layers=layers, verify=True)["verification"]
    assert report["exact_expected"] is False and report["passed"] and report["beats_random_init"]
    source_sparse, target = _sparse(_load(src)), _load(dst)
    n = len(source_sparse)
    # qwen3_moe: layers 0 and 2 are dense by decoder_sparse_step=2; the copy of layer 0 at 3 stays dense
    assert _sparse(target) == [source_sparse[i % n] for i in range(layers)]
    old, new = _tensors(src), _tensors(dst)
    if kind == "mixtral":  # target layer 2 is a copy of layer 0, expert by expert
        gate = NAMES[kind][0]
        for e in range(4):
            assert torch.equal(new[gate.format(e=e).replace("layers.0.", "layers.2.")], old[gate.format(e=e)])


def test_select_keeps_fewer_experts_with_their_router_rows(model_dir, tmp_path):
    src, dst = model_dir("qwen2_moe"), tmp_path / "fewer"
    result = grow.shrink(src, dst, method="select", experts=2, verify=True)
    report = result["verification"]
    assert report["exact_expected"] is False and report["passed"] and report["beats_random_init"]
    assert any("experts [0, 2] of 4 kept" in n for n in result["plan"]["notes"])
    model = _load(dst)
    assert model.config.num_experts == 2 and _sparse(model) == [True, False]
    old, new = _tensors(src), _tensors(dst)
    gate, down, router = NAMES["qwen2_moe"]
    assert torch.equal(new[router], old[router][[0, 2]])
    for k, j in enumerate([0, 2]):
        assert torch.equal(new[gate.format(e=k)], old[gate.format(e=j)])
        assert torch.equal(new[down.format(e=k)], old[down.format(e=j)])
    assert gate.format(e=2) not in new
    for name in ("model.layers.0.mlp.shared_expert.up_proj.weight", "model.layers.0.mlp.shared_expert_gate.weight",
                 "model.layers.1.mlp.up_proj.weight"):
        assert torch.equal(new[name], old[name])


@pytest.mark.parametrize("kind", ["mixtral", "olmoe"])
def test_select_experts_with_other_sizes(model_dir, tmp_path, kind):
    src, dst = model_dir(kind), tmp_path / "small"
    grow.shrink(src, dst, method="select", experts=3, hidden=16, heads=2, layers=1, element_selection="first")
    model = _load(dst)
    cfg = json.loads((dst / "config.json").read_text())
    experts = cfg["num_local_experts" if kind == "mixtral" else "num_experts"]
    assert (experts, cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]) == (3, 16, 2, 1)
    old, new = _tensors(src), _tensors(dst)
    router = NAMES[kind][2]
    assert torch.equal(new[router], old[router][:3, :16])
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 160)


@pytest.mark.parametrize("kind,args,message", [
    ("mixtral", ["expand", "{src}", "{dst}", "--method", "lemon", "--hidden", "64"],
     "grow cannot expand a MixtralForCausalLM checkpoint with --method lemon; it can expand --method hypercloning "
     "or stack; shrink --method select"),
    ("qwen2_moe", ["upcycle", "{src}", "{dst}", "--experts", "8", "--top-k", "2"],
     "grow cannot upcycle a Qwen2MoeForCausalLM checkpoint with --method moe"),
    ("qwen3_moe", ["shrink", "{src}", "{dst}", "--method", "subclone", "--layers", "2"],
     "cannot shrink a Qwen3MoeForCausalLM checkpoint with --method subclone"),
    ("mixtral", ["shrink", "{src}", "{dst}", "--experts", "1"],
     "--experts 1 is fewer than the 2 experts each token uses (num_experts_per_tok in config.json); keep at least 2"),
    ("mixtral", ["shrink", "{src}", "{dst}", "--experts", "5"], "--experts must be a whole number from 1 to 4"),
    ("qwen2_moe", ["shrink", "{src}", "{dst}", "--ffn", "16"], "--ffn does not apply to a Qwen2MoeForCausalLM source"),
    ("llama", ["shrink", "{src}", "{dst}", "--experts", "2"], "--experts applies to a mixture of experts"),
])
def test_methods_without_a_rule_for_experts_exit_2(model_dir, tmp_path, kind, args, message):
    dst = tmp_path / "out"
    res = CliRunner().invoke(app, [a.format(src=model_dir(kind), dst=dst) for a in args])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert not dst.exists()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_bf16_moe_source_grows_into_a_bf16_output_that_runs_in_bf16(model_dir, tmp_path, kind):
    """A mixture of experts saved in bfloat16, as users have them: the HyperCloning output is bf16, exact
    at bf16's rounding, and its verify report shows it ran in bf16 (experts and router in that dtype)."""
    import transformers

    src, dst = tmp_path / "bf16", tmp_path / "wide"
    transformers.AutoModelForCausalLM.from_pretrained(str(model_dir(kind)), dtype=torch.bfloat16).save_pretrained(src)
    report = grow.expand(src, dst, method="hypercloning", factor=2, verify=True)["verification"]
    assert report["passed"] and report["layer_by_layer"], report
    assert report["dtype_check"]["dtype"] == "bfloat16" and report["dtype_check"]["ran"], report["dtype_check"]
    assert {t.dtype for t in _tensors(dst).values()} == {torch.bfloat16}
