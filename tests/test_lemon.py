"""LEMON is exact for any larger widths and depths: every architecture, tied and untied heads,
widths that are and are not multiples, depth alone and with width; copies start unequal."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import grow
from conftest import timm_case
from grow.arch.view import ModelView
from grow.cli import app
from grow.plan import AxisMap, TensorRecipe, materialize

CASES = [
    ("llama", False, dict(hidden=120, ffn=150, heads=15, layers=5)),  # nothing a multiple; kv heads 3 -> 5
    ("llama", True, dict(hidden=144)),  # a multiple, tied head
    ("llama_mqa", False, dict(hidden=96, heads=12)),  # one kv head -> 2
    ("mistral", False, dict(hidden=100, ffn=150)),
    ("qwen2", False, dict(layers=5)),  # depth only
    ("qwen3", True, dict(hidden=100, heads=6, layers=3)),  # head_dim != hidden / heads, q/k norms
    ("qwen3", False, dict(ffn=200)),
    ("gpt2", False, dict(hidden=84, ffn=250, layers=3)),  # LayerNorm: average expansion; heads follow hidden
    ("gpt2", True, dict(hidden=96)),
    timm_case("vit", False, dict(hidden=80, ffn=250, layers=3)),
]


@pytest.mark.parametrize("kind,tied,sizes", CASES)
def test_lemon_is_exact(model_dir, tmp_path, kind, tied, sizes):
    src, dst = model_dir(kind, tied), tmp_path / "out"
    report = grow.expand(src, dst, method="lemon", verify=True, **sizes)["verification"]
    assert report["passed"] and report["rel_error"] <= 1e-4, report
    assert report["top1_agreement"] == 1.0
    recipe = json.loads((dst / "grow.json").read_text())
    assert recipe["method"] == "lemon" and recipe["exact"] is True
    for key, value in sizes.items():
        assert recipe["target"]["sizes"][key] == value


def test_copies_are_unequal_pieces_of_the_source(model_dir, tmp_path):
    src = model_dir("llama")
    dst = tmp_path / "out"
    grow.expand(src, dst, method="lemon", hidden=180, ffn=150)  # 2 copies of 72 + 36 new entries
    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    w, q = a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (72, 180)
    torch.testing.assert_close(q[:, :72] + q[:, 72:144], w)  # the pieces add up to the source column
    assert not torch.allclose(q[:, :72], q[:, 72:144])
    assert q[:, 144:].abs().sum() > 0  # columns reading the always-zero entries are free
    down_src, down = a["model.layers.0.mlp.down_proj.weight"], b["model.layers.0.mlp.down_proj.weight"]
    # FFN unit u (u < 38) appears twice: its two down-projection columns are unequal pieces of the source's
    # (times sqrt(D / kd), which keeps the mean square of the residual)
    torch.testing.assert_close((down[:72, :38] + down[:72, 112:]) * (144 / 180) ** 0.5, down_src[:, :38])
    assert not torch.allclose(down[:72, :38], down[:72, 112:])
    assert torch.equal(down[144:], torch.zeros_like(down[144:]))  # RMSNorm: the new residual entries stay 0


def test_new_layers_are_identity_blocks(model_dir, tmp_path):
    dst = tmp_path / "out"
    result = grow.expand(model_dir("qwen2"), dst, method="lemon", layers=5, verify=True)
    assert result["verification"]["passed"]
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5 and len(cfg["layer_types"]) == 5
    w = load_file(str(dst / "model.safetensors"))
    new = [i for i in range(5) if not w[f"model.layers.{i}.self_attn.o_proj.weight"].any()]
    assert len(new) == 3
    for i in new:
        assert not w[f"model.layers.{i}.mlp.down_proj.weight"].any()
        assert w[f"model.layers.{i}.mlp.up_proj.weight"].any()  # the rest is a copy that can learn
    recipe = json.loads((dst / "grow.json").read_text())  # nothing widened: no copies side by side to tell apart
    assert recipe["stats"]["symmetry_breaking"] == "none needed" and not any("pieces" in n for n in recipe["notes"])


@pytest.mark.no_transformers
def test_mix_makes_weighted_sums_of_source_positions():
    t = torch.arange(6.0).view(2, 3)
    mix = (torch.tensor([3]), torch.full((1, 3), 1 / 3))
    r = TensorRecipe("x", (2, 4), "F32", sources=("x",),
                     axes=(None, AxisMap(torch.tensor([0, 1, 2, -1]), mix=mix)))
    out = materialize(r, lambda _: t)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1, 2, 1], [3, 4, 5, 4]]))


def test_dry_run_writes_nothing(model_dir, tmp_path):
    result = CliRunner().invoke(app, ["expand", str(model_dir("gpt2")), str(tmp_path / "out"), "--method", "lemon",
                                      "--hidden", "60", "--layers", "3", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)["plan"]
    assert plan["method"] == "lemon" and plan["exact"] and plan["target_sizes"]["heads"] == 5
    assert "mean in the new" in " ".join(t["recipe"] for t in plan["tensors"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind,args,words", [
    ("llama", ["--heads", "10"], "multiple of 3"),
    ("llama", ["--heads", "12", "--kv-heads", "3"], "query heads per kv head"),
    ("llama", ["--hidden", "100"], "hidden % heads == 0"),
    ("gpt2", ["--hidden", "50"], "multiple of head_dim (12)"),
    ("gpt2", ["--hidden", "60", "--heads", "6"], "hidden = heads x head_dim"),
    ("qwen2", ["--ffn", "50"], "smaller than the source's 96"),
    ("qwen2", [], "at least one size larger"),
    ("qwen2", ["--factor", "2"], "--factor does not apply"),
])
def test_bad_sizes_are_refused(model_dir, tmp_path, kind, args, words):
    result = CliRunner().invoke(app, ["expand", str(model_dir(kind)), str(tmp_path / "out"), "--method", "lemon", *args])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["lemon", "msg"])
def test_other_block_kinds_are_refused(model_dir, method):
    from grow.checkpoint import Source
    from grow.errors import UsageError
    from grow.ops import EXPAND_METHODS

    view = ModelView(Source(model_dir("gpt2")))
    view.spec = copy.copy(view.spec)
    view.spec.block = "parallel"  # a spec describing a block kind neither method knows (post-LN: test_encoders)
    with pytest.raises(UsageError, match="needs a pre-LN or post-LN model"):
        EXPAND_METHODS[method](view, layers=3)
