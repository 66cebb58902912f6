"""Shrinking: weight selection and weight subcloning on every architecture, their index sets, the
layer-by-layer calibration, bad sizes, and the training evidence that they beat a random start."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import grow
from conftest import MODEL_KINDS, timm_case
from grow import calibrate
from grow.arch.view import ModelView
from grow.checkpoint import Source
from grow.cli import app
from grow.ops import subclone
from grow.verify import compare, load_model, run, sample_inputs

# A smaller shape for each architecture: whole heads, whole kv groups, fewer layers.
SHAPES = {
    "llama": dict(hidden=36, ffn=56, heads=4, kv_heads=2, layers=1),  # 9 heads / 3 kv -> 4 / 2
    "llama_mqa": dict(hidden=24, ffn=40, heads=3, layers=1),
    "mistral": dict(hidden=32, ffn=48, heads=4, kv_heads=1),
    "qwen2": dict(hidden=32, heads=2, kv_heads=1, layers=1),
    "qwen3": dict(hidden=24, ffn=48, heads=2, kv_heads=1),  # head_dim 16 kept although hidden / heads is 12
    "gpt2": dict(hidden=24, ffn=96, heads=2, layers=1),
    "vit": dict(hidden=32, ffn=64, heads=2, layers=1),
}
HIDDEN_KEY = {"gpt2": "n_embd", "vit": "embed_dim"}
HEADS_KEY = {"gpt2": "n_head", "vit": "num_heads"}
runner = CliRunner()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random calibration tokens for models without a tokenizer
        return fn(*args, **kwargs)


@pytest.mark.parametrize("method", ["select", "subclone"])
@pytest.mark.parametrize("kind,tied", MODEL_KINDS + [timm_case("vit", False)])
def test_shrink_every_architecture(model_dir, tmp_path, kind, tied, method):
    src, dst = model_dir(kind, tied), tmp_path / "out"
    shape = SHAPES[kind]
    result = _quiet(grow.shrink, src, dst, method=method, verify=True, **shape)
    report = result["verification"]
    assert report["passed"] and report["exact_expected"] is False
    assert "baseline_random_init" in report and 0 <= report["top1_agreement"] <= 1
    sizes = grow.inspect(dst)
    assert sizes[HIDDEN_KEY.get(kind, "hidden_size")] == shape["hidden"]
    assert sizes[HEADS_KEY.get(kind, "num_attention_heads")] == shape["heads"]
    assert sizes["parameters"] == result["target_parameters"] < result["source_parameters"]
    recipe = json.loads((dst / "grow.json").read_text())
    assert recipe["operation"] == "shrink" and recipe["method"] == method and recipe["exact"] is False
    framework = "timm" if kind == "vit" else "transformers"
    model = load_model(dst, framework)  # reloads in transformers / timm and runs
    out = run(model, sample_inputs(json.loads((src / "config.json").read_text()), framework, 0, vocab=100), framework)
    assert torch.isfinite(out).all()
    if tied:  # the tie stays, except where the residual was rotated (the final norm folds into the head only)
        rotated = recipe["options"].get("residual") == "pca"
        assert ("lm_head.weight" in load_file(str(dst / "model.safetensors"))) == rotated
        assert json.loads((dst / "config.json").read_text()).get("tie_word_embeddings", True) is not rotated


def _zero_units(src, dst, *, ffn_keep, q_keep=None, kv_drop=None, inputs=False):
    """Copy a model, making FFN units outside ffn_keep and heads outside q_keep inert: with inputs=False
    their contribution to the residual is zeroed (fan-in columns of the readers); with inputs=True their
    activations are zeroed (FFN units' input rows, the k and v rows of the kv heads in kv_drop)."""
    shutil.copytree(src, dst)
    view = ModelView(Source(src))
    hd = view.sizes["head_dim"]
    tensors = load_file(str(src / "model.safetensors"))
    for e in view.entries:
        if e.layer is None:
            continue
        t = tensors[e.name]
        for axis, spaces in enumerate(e.spec.axes):
            reader = axis == e.spec.reads
            offset = 0
            for space in spaces:
                n = view.spec.space_size(space, view.sizes)
                drop = None
                if space == "ffn" and reader != inputs:
                    drop = [u for u in range(n) if u not in ffn_keep]
                elif space == "q" and reader and not inputs and q_keep is not None:
                    drop = [u for u in range(n) if u // hd not in q_keep]
                elif space == "kv" and not reader and inputs and kv_drop is not None:
                    drop = [u for u in range(n) if u // hd in kv_drop]
                if drop:
                    t.index_fill_(axis, torch.tensor(drop) + offset, 0.0)
                offset += n or 0
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


INERT = {  # options, and the query heads that 'first' selection keeps
    "llama": (dict(heads=4, kv_heads=2, ffn=56), {0, 1, 3, 4}),  # 9 heads / 3 kv: first 2 of kv groups 0, 1
    "llama_mqa": (dict(heads=3, ffn=40), {0, 1, 2}),
    "qwen3": (dict(heads=2, kv_heads=1, ffn=48), {0, 1}),
    "gpt2": (dict(ffn=96), None),  # head width is hidden / heads: heads cannot go without hidden
    "vit": (dict(ffn=40), None),
}


@pytest.mark.parametrize("kind", list(INERT))
def test_select_keeps_grouped_query_mapping(model_dir, tmp_path, kind):
    """Heads and FFN units that contribute nothing are exactly the ones 'first' selection drops, so the
    shrunk model must compute what the source does; a wrong head, kv group or slice would not."""
    opts, q_keep = INERT[kind]
    inert = _zero_units(model_dir(kind), tmp_path / "inert", ffn_keep=set(range(opts["ffn"])), q_keep=q_keep)
    dst = tmp_path / "out"
    grow.shrink(inert, dst, method="select", element_selection="first", **opts)
    framework = "timm" if kind == "vit" else "transformers"
    x = sample_inputs(json.loads((inert / "config.json").read_text()), framework, 0, vocab=100)
    r = compare(run(load_model(inert, framework), x, framework), run(load_model(dst, framework), x, framework))
    assert r["rel_error"] < 1e-5, r


def test_contribution_ranking_keeps_the_units_that_write(model_dir, tmp_path):
    """FFN units and heads whose output weights are zero are as active as any, but write nothing:
    --unit-ranking contribution drops exactly them, ranking by activation keeps some of them."""
    keep, q_keep = set(range(0, 112, 2)), {0, 1, 3, 4}
    inert = _zero_units(model_dir("llama"), tmp_path / "inert", ffn_keep=keep, q_keep=q_keep)
    dead = {}
    for ranking in ("activation", "contribution"):
        dst = tmp_path / ranking
        _quiet(grow.shrink, inert, dst, method="subclone", ffn=56, heads=4, kv_heads=2, unit_ranking=ranking,
               calibration_tokens=256)
        w = load_file(str(dst / "model.safetensors"))
        dead[ranking] = sum(int((w[f"model.layers.{i}.mlp.down_proj.weight"].abs().sum(0) == 0).sum()) +
                            int((w[f"model.layers.{i}.self_attn.o_proj.weight"].abs().sum(0) == 0).sum()) for i in (0, 1))
        assert json.loads((dst / "grow.json").read_text())["options"]["unit_ranking"] == ranking
    assert dead["contribution"] == 0 and dead["activation"] > 10, dead


@pytest.mark.parametrize("chunk", [None, 64])
def test_unit_norms_are_the_fan_in_column_norms(model_dir, monkeypatch, chunk):
    """The norms contribution ranking uses are each reader's fan-in column norms, taken from the weights the
    calibration pass loads anyway, or read from the checkpoint for a Linear run in row blocks (chunk)."""
    import grow.layerwise

    if chunk is not None:
        monkeypatch.setattr(grow.layerwise, "CHUNK_BYTES", chunk)
    src = model_dir("gpt2")  # Conv1D: the units are the rows of the stored weight
    w = load_file(str(src / "model.safetensors"))
    imp = calibrate.collect(ModelView(Source(src)), torch.randint(0, 100, (2, 16)), "random ids")
    for i in (0, 1):
        torch.testing.assert_close(imp.unit_norms[(i, "ffn")], w[f"transformer.h.{i}.mlp.c_proj.weight"].double().norm(dim=1).float())
        torch.testing.assert_close(imp.unit_norms[(i, "q")], w[f"transformer.h.{i}.attn.c_proj.weight"].double().norm(dim=1).float())


def test_select_slices_fused_qkv_by_whole_heads(model_dir, tmp_path):
    src, dst = model_dir("gpt2"), tmp_path / "out"
    grow.shrink(src, dst, method="select", hidden=24, heads=2)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    h = torch.arange(24) * 2
    q = (torch.tensor([0, 2])[:, None] * 12 + torch.arange(12)).flatten()  # uniform: heads 0 and 2 of 4
    qkv = torch.cat([q, q + 48, q + 96])
    assert torch.equal(b["transformer.h.0.attn.c_attn.weight"], a["transformer.h.0.attn.c_attn.weight"][h][:, qkv])
    assert torch.equal(b["transformer.h.0.attn.c_attn.bias"], a["transformer.h.0.attn.c_attn.bias"][qkv])
    assert torch.equal(b["transformer.h.1.attn.c_proj.weight"], a["transformer.h.1.attn.c_proj.weight"][q][:, h])


def test_select_uses_one_index_set_per_space_and_no_rescaling(model_dir, tmp_path):
    src, dst = model_dir("llama"), tmp_path / "out"
    grow.shrink(src, dst, method="select", hidden=36, ffn=56, heads=4, kv_heads=2, layers=1, layer_selection="uniform")
    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    h = torch.arange(36) * 2  # uniform: every other residual dim
    f = torch.arange(56) * 2
    q = (torch.tensor([0, 1, 3, 4])[:, None] * 8 + torch.arange(8)).flatten()  # heads 0, 1 (kv 0) and 3, 4 (kv 1)
    kv = torch.arange(16)
    assert torch.equal(b["model.embed_tokens.weight"], a["model.embed_tokens.weight"][:, h])
    assert torch.equal(b["lm_head.weight"], a["lm_head.weight"][:, h])
    assert torch.equal(b["model.norm.weight"], a["model.norm.weight"][h])
    src_layer = "model.layers.0."  # uniform over 2 layers keeping 1: layer 0
    pairs = {
        "self_attn.q_proj.weight": a[src_layer + "self_attn.q_proj.weight"][q][:, h],
        "self_attn.k_proj.weight": a[src_layer + "self_attn.k_proj.weight"][kv][:, h],
        "self_attn.o_proj.weight": a[src_layer + "self_attn.o_proj.weight"][h][:, q],
        "mlp.gate_proj.weight": a[src_layer + "mlp.gate_proj.weight"][f][:, h],
        "mlp.down_proj.weight": a[src_layer + "mlp.down_proj.weight"][h][:, f],
        "input_layernorm.weight": a[src_layer + "input_layernorm.weight"][h],
    }
    for name, expected in pairs.items():
        assert torch.equal(b["model.layers.0." + name], expected), name
    assert "model.layers.1.mlp.up_proj.weight" not in b


def test_layer_selection_and_per_layer_config(tmp_path):
    """Depth changes rebuild layer_types and max_window_layers from the layers kept."""
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=4, use_sliding_window=True,
                                   sliding_window=8, max_window_layers=2, max_position_embeddings=64)
    torch.manual_seed(0)
    src = tmp_path / "src"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    types = json.loads((src / "config.json").read_text())["layer_types"]
    assert types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    a = load_file(str(src / "model.safetensors"))
    cases = [("select", dict(layer_selection="first"), [0, 1, 2]), ("select", dict(layer_selection="uniform"), [0, 2, 3]),
             ("subclone", dict(layer_removal="middle"), [0, 1, 3])]
    for method, opts, kept in cases:
        dst = tmp_path / f"{method}{len(opts)}{opts.get('layer_selection', '')}"
        _quiet(grow.shrink, src, dst, method=method, layers=3, **opts)
        out = json.loads((dst / "config.json").read_text())
        assert out["num_hidden_layers"] == 3
        assert out["layer_types"] == [types[j] for j in kept], (method, opts)
        assert out["max_window_layers"] == sum(j < 2 for j in kept)
        b = load_file(str(dst / "model.safetensors"))
        for i, j in enumerate(kept):
            assert torch.equal(b[f"model.layers.{i}.mlp.up_proj.weight"], a[f"model.layers.{j}.mlp.up_proj.weight"])
        model = load_model(dst, "transformers")
        assert model.config.layer_types == out["layer_types"]


@pytest.mark.parametrize("kind", ["qwen2", "gpt2", timm_case("vit")])
def test_subclone_removes_the_layer_that_changes_the_residual_least(model_dir, tmp_path, kind):
    """A block whose residual writers are zero passes its input through: block influence 0 and skip loss
    0, so it is the layer removed by either (position would have removed another), and the shrunk model
    computes what the source does."""
    src = model_dir(kind)
    view = ModelView(Source(src))
    inert = tmp_path / "inert"
    shutil.copytree(src, inert)
    tensors = load_file(str(src / "model.safetensors"))
    for e in view.layer(1):
        if e.spec.writes_residual:
            tensors[e.name].zero_()
    save_file(tensors, str(inert / "model.safetensors"), metadata={"format": "pt"})
    imp = _quiet(calibrate.importance, ModelView(Source(inert)), tokens=256, layer_loss=True)
    assert imp.influence[1] == pytest.approx(0.0, abs=1e-12) and imp.influence[0] > 1e-3
    assert imp.skip_loss[1] == pytest.approx(0.0, abs=1e-9) and imp.skip_loss[0] > 1e-4
    framework = "timm" if kind == "vit" else "transformers"
    x = sample_inputs(json.loads((inert / "config.json").read_text()), framework, 0, vocab=100)
    for removal, why in (("influence", "the least influential removed: 1: "),
                         ("loss", "those whose skipping costs least removed, KL: 1: ")):
        dst = tmp_path / removal
        result = _quiet(grow.shrink, inert, dst, method="subclone", layers=1, calibration_tokens=256,
                        layer_removal=removal)
        assert any(f"layers [0] of 2 kept ({why}" in n for n in result["plan"]["notes"]), result["plan"]["notes"]
        r = compare(run(load_model(inert, framework), x, framework), run(load_model(dst, framework), x, framework))
        assert r["rel_error"] < 1e-5, r


def test_layer_loss_scores_are_added_to_a_scores_file(model_dir, tmp_path):
    """A scores file written without skip losses gets them when --layer-removal loss (the default) needs
    them; a bare encoder, whose output is no distribution, is refused, and by default falls back to influence."""
    src, scores = model_dir("qwen2"), tmp_path / "s.safetensors"
    _quiet(grow.shrink, src, tmp_path / "a", method="subclone", layers=1, calibration_tokens=256, scores=scores,
           layer_removal="influence")
    assert calibrate.load(scores, ModelView(Source(src))).skip_loss is None
    result = _quiet(grow.shrink, src, tmp_path / "b", method="subclone", layers=1, calibration_tokens=256,
                    scores=scores)  # the default
    assert json.loads((tmp_path / "b" / "grow.json").read_text())["options"]["layer_removal"] == "loss"
    assert calibrate.load(scores, ModelView(Source(src))).skip_loss.shape == (2,)
    with pytest.raises(grow.UsageError, match="--layer-removal loss needs an output head, and a BertModel"):
        _quiet(grow.shrink, model_dir("bert"), tmp_path / "c", method="subclone", layers=1, calibration_tokens=256,
               layer_removal="loss")
    result = _quiet(grow.shrink, model_dir("bert"), tmp_path / "d", method="subclone", layers=1,
                    calibration_tokens=256)
    assert json.loads((tmp_path / "d" / "grow.json").read_text())["options"]["layer_removal"] == "influence"
    assert any("layers removed by block influence: the output is hidden states" in n for n in result["plan"]["notes"])


def _residual_in_subspace(src, dst, k: int):
    """Copy a model, projecting every residual writer onto a random k-dim subspace (not aligned with the
    axes): its residual stream then lives in that subspace."""
    shutil.copytree(src, dst)
    view = ModelView(Source(src))
    d = view.sizes["hidden"]
    u = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    projection = (u @ u.T).float()
    tensors = load_file(str(src / "model.safetensors"))
    for e in view.entries:
        for axis, spaces in enumerate(e.spec.axes):
            if e.spec.writes_residual and spaces == ("hidden",) and axis != e.spec.reads:
                tensors[e.name] = (tensors[e.name].movedim(axis, -1) @ projection).movedim(-1, axis).contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("kind,tied,k", [("llama", False, 36), ("llama", True, 36), ("qwen3", False, 24)])
def test_rotation_cuts_a_residual_that_lives_in_a_subspace_exactly(model_dir, tmp_path, kind, tied, k):
    """When every writer of the residual writes into a random half of its directions, rotating onto the
    principal directions and cutting the other half loses nothing (norm weights folded into the readers,
    a tied head untied), while keeping the most active dims loses much."""
    src = _residual_in_subspace(model_dir(kind, tied), tmp_path / "src", k)
    x = sample_inputs(json.loads((src / "config.json").read_text()), "transformers", 0, vocab=100)
    source = run(load_model(src, "transformers"), x, "transformers")
    errors = {}
    for residual in ("pca", "activation"):
        dst = tmp_path / residual
        result = _quiet(grow.shrink, src, dst, method="subclone", hidden=k, residual=residual, calibration_tokens=512)
        errors[residual] = compare(source, run(load_model(dst, "transformers"), x, "transformers"))["rel_error"]
        cfg = json.loads((dst / "config.json").read_text())
        assert cfg["hidden_size"] == k
        weights = load_file(str(dst / "model.safetensors"))
        if residual == "pca":
            assert cfg["tie_word_embeddings"] is False and weights["lm_head.weight"].shape[1] == k
            d = ModelView(Source(src)).sizes["hidden"]
            assert torch.allclose(weights["model.norm.weight"], torch.full((k,), (d / k) ** 0.5), rtol=1e-4)
            assert result["plan"]["stats"]["residual_kept"] == pytest.approx(1.0, abs=1e-5)
    # not 1e-6: each norm's eps now meets a mean square over k dims, not d (1e-4 of this tiny model's residual)
    assert errors["pca"] < 1e-3 and errors["activation"] > 0.05, errors


def test_rotation_is_refused_where_the_norm_subtracts_the_mean(model_dir, tmp_path):
    with pytest.raises(grow.UsageError, match="--residual pca cannot rotate .* LayerNorm subtracts the mean"):
        _quiet(grow.shrink, model_dir("gpt2"), tmp_path / "x", method="subclone", hidden=24, heads=2, residual="pca",
               calibration_tokens=128)
    result = _quiet(grow.shrink, model_dir("gpt2"), tmp_path / "y", method="subclone", hidden=24, heads=2,
                    calibration_tokens=128, dry_run=True)
    assert any("residual cut by activation, not rotated: a gpt2 model's LayerNorm" in n for n in result["plan"]["notes"])


@pytest.mark.no_transformers
def test_vit_small_to_tiny(tmp_path):
    """The published case: a ViT-S-shaped model (384 wide, 6 heads) to the ViT-T shape (192, 3 heads)."""
    from tiny_models import save_vit

    src = save_vit(tmp_path / "vit_s", embed_dim=384, num_heads=6, depth=2)
    for method in ("select", "subclone"):
        dst = tmp_path / method
        result = _quiet(grow.shrink, src, dst, method=method, hidden=192, heads=3, ffn=768, verify=True)
        sizes = grow.inspect(dst)
        assert (sizes["embed_dim"], sizes["num_heads"], sizes["ffn"]) == (192, 3, 768)
        cfg = json.loads((dst / "config.json").read_text())
        assert cfg["num_features"] == 192 and cfg["model_args"].get("mlp_ratio", 4.0) == 4.0
        assert result["verification"]["passed"]


def test_subclone_ranks_by_activation(model_dir, tmp_path):
    """Dead FFN units and a dead kv group (zero k and v) score exactly 0 and are the ones subcloning drops;
    every Linear whose input shrank is scaled by sqrt(D/d)."""
    src = model_dir("llama")
    keep = set(range(0, 112, 2))  # even FFN units live
    dead = _zero_units(src, tmp_path / "dead", ffn_keep=keep, kv_drop={1}, inputs=True)
    view = ModelView(Source(dead))
    imp = _quiet(calibrate.importance, view, tokens=256)
    for layer in range(2):
        ffn = imp.units[(layer, "ffn")]
        assert torch.all(ffn[1::2] == 0) and torch.all(ffn[0::2] > 0)
        heads = imp.head_scores(layer, 8)
        assert torch.all(heads[3:6] == 0) and torch.all(heads[:3] > 0) and torch.all(heads[6:] > 0)
    plan = subclone.build(view, importance=imp, ffn=56, heads=6, kv_heads=2, hidden=48, calibration_tokens=256,
                          residual="activation")
    by_name = {r.name: r for r in plan.recipes}
    down = by_name["model.layers.0.mlp.down_proj.weight"]
    assert set(down.axes[1].index.tolist()) == keep
    assert down.scale == pytest.approx((112 / 56) ** 0.5)
    k = by_name["model.layers.1.self_attn.k_proj.weight"]
    assert sorted(set((k.axes[0].index // 8).tolist())) == [0, 2]  # kv group 1 dropped
    assert k.scale == pytest.approx((72 / 48) ** 0.5)
    assert by_name["model.layers.0.self_attn.o_proj.weight"].scale == pytest.approx((72 / 48) ** 0.5)
    assert by_name["lm_head.weight"].scale == pytest.approx((72 / 48) ** 0.5)
    assert by_name["model.embed_tokens.weight"].scale == 1.0
    hidden = by_name["model.norm.weight"].axes[0].index
    assert torch.equal(hidden, torch.topk(imp.hidden, 48).indices.sort().values)


@pytest.mark.parametrize("kind", ["llama", "gpt2", timm_case("vit")])
def test_calibration_runs_one_module_at_a_time(model_dir, kind):
    """The layer-by-layer statistics equal those of the whole model run at once, while no more than one
    layer's weights (or one global tensor) was ever in memory."""
    src = model_dir(kind)
    view = ModelView(Source(src))
    make = calibrate.image_batch if kind == "vit" else calibrate.token_batch
    inputs, description, _ = _quiet(make, view, None, 256)
    imp = calibrate.collect(view, inputs, description)

    framework = view.spec.framework
    model = load_model(src, framework)
    hidden, units, hooks = calibrate._Stats(), {k: calibrate._Stats() for k in imp.units}, []
    hooks.append(model.get_submodule(view.spec.layer_module(0)).register_forward_pre_hook(
        lambda _m, a, k: hidden.add(a[0] if a else k["hidden_states"]), with_kwargs=True))
    for i in range(view.sizes["layers"]):
        hooks.append(model.get_submodule(view.spec.layer_module(i)).register_forward_hook(
            lambda _m, _a, o: hidden.add(calibrate._first(o))))
    for key, name in calibrate._unit_readers(view).items():
        hooks.append(model.get_submodule(name).register_forward_pre_hook(lambda _m, a, k=key: units[k].add(a[0])))
    with torch.no_grad():
        model(inputs)
    assert torch.allclose(hidden.mean(), imp.hidden, rtol=1e-5, atol=1e-6)
    for key in units:
        assert torch.allclose(units[key].mean(), imp.units[key], rtol=1e-5, atol=1e-6), key
    influence, covariance = calibrate._Influence(view.sizes["layers"]), calibrate._Covariance(view.sizes["hidden"])
    hooks = influence.attach(model, view) + covariance.attach(model, view)
    with torch.no_grad():
        model(inputs)
    for h in hooks:
        h.remove()
    assert torch.allclose(influence.mean(), imp.influence, rtol=1e-5, atol=1e-7)
    assert torch.all(imp.influence > 0) and torch.all(imp.influence < 2)
    assert torch.allclose(covariance.mean(), imp.covariance, rtol=1e-5, atol=1e-7)
    assert imp.covariance.dtype == torch.float64 and imp.covariance.trace() == pytest.approx(view.sizes["hidden"])

    per_layer = [sum(e.info.nbytes for e in view.layer(i)) for i in range(view.sizes["layers"])]
    largest_global = max(e.info.nbytes for e in view.globals())
    root = sum(e.info.nbytes for e in view.globals() if "." not in e.name)  # timm's class token and positions
    assert 0 < imp.peak_param_bytes <= max(max(per_layer), largest_global) + root
    assert imp.peak_param_bytes < sum(e.info.nbytes for e in view.entries) / 2


def test_scores_are_saved_and_reused(model_dir, tmp_path):
    src, scores = model_dir("qwen2"), tmp_path / "scores.safetensors"
    with pytest.warns(UserWarning, match="random tokens"):
        first = grow.shrink(src, tmp_path / "a", method="subclone", hidden=32, ffn=48, scores=scores,
                            calibration_tokens=256)
    assert scores.is_file()
    before = scores.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reused scores: no calibration, so no random-token warning
        second = grow.shrink(src, tmp_path / "b", method="subclone", hidden=32, ffn=48, scores=scores,
                             calibration_tokens=512)
    assert scores.stat().st_mtime_ns == before
    assert load_file(str(tmp_path / "a" / "model.safetensors")).keys() == load_file(str(tmp_path / "b" / "model.safetensors")).keys()
    for name, t in load_file(str(tmp_path / "a" / "model.safetensors")).items():
        assert torch.equal(t, load_file(str(tmp_path / "b" / "model.safetensors"))[name])
    assert first["target_parameters"] == second["target_parameters"]
    with pytest.raises(grow.UsageError, match="--scores .* another shape"):
        grow.shrink(model_dir("llama"), tmp_path / "c", method="subclone", hidden=32, scores=scores)


BAD = [
    ("llama", ["--hidden", "144"], "--hidden must be a whole number from 1 to 72"),
    ("llama", ["--layers", "0"], "--layers must be a whole number from 1"),
    ("llama", ["--heads", "8"], "8 query heads cannot be shared among 3 kv heads"),
    ("llama", ["--heads", "8", "--kv-heads", "2"], "a source kv head serves only 3"),
    ("llama", ["--kv-heads", "4"], "--kv-heads must be a whole number from 1 to 3"),
    ("llama_mqa", ["--kv-heads", "2"], "--kv-heads must be a whole number from 1 to 1"),
    ("gpt2", ["--hidden", "24"], "needs --heads 2"),
    ("gpt2", ["--hidden", "30", "--heads", "2"], "not a multiple of the head size 12"),
    ("vit", ["--kv-heads", "1"], "--kv-heads does not apply"),
    ("llama", [], "nothing to shrink"),
    ("llama", ["--hidden", "36", "--element-selection", "best"], "--element-selection best is not one of"),
    ("llama", ["--layers", "1", "--layer-selection", "last"], "--layer-selection last is not one of"),
    ("llama", ["--method", "subclone", "--layers", "1", "--layer-selection", "first"], "--layer-selection does not apply"),
    ("llama", ["--method", "select", "--hidden", "36", "--scores", "x"], "--scores does not apply"),
    ("llama", ["--method", "subclone", "--ffn", "56", "--unit-ranking", "x", "--calibration-tokens", "256"],
     "--unit-ranking x is not one of activation, contribution"),
    ("llama", ["--method", "subclone", "--layers", "1", "--layer-removal", "x", "--calibration-tokens", "256"],
     "--layer-removal x is not one of influence, loss, middle"),
    ("llama", ["--method", "prune", "--hidden", "36"], "--method prune is not a way to shrink"),
]


@pytest.mark.parametrize("kind,args,message", BAD)
def test_impossible_sizes_exit_2(model_dir, kind, args, message):
    result = runner.invoke(app, ["shrink", str(model_dir(kind)), "--dry-run", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output


def test_cli_dry_run_and_recipe(model_dir, tmp_path):
    src, dst = model_dir("mistral"), tmp_path / "out"
    result = runner.invoke(app, ["shrink", str(src), str(dst), "--dry-run", "--json", "--hidden", "32", "--layers", "1"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert plan["target_sizes"]["hidden"] == 32 and plan["target_sizes"]["layers"] == 1
    assert any("uniform 32 of 64" in t["recipe"] for t in plan["tensors"])
    assert not dst.exists()
    result = runner.invoke(app, ["shrink", str(src), str(dst), "--json", "--heads", "4", "--kv-heads", "1",
                                 "--element-selection", "random", "--seed", "3"])
    assert result.exit_code == 0, result.output
    recipe = json.loads((dst / "grow.json").read_text())
    assert recipe["options"]["element_selection"] == "random" and recipe["options"]["seed"] == 3
    assert recipe["target"]["sizes"]["kv_heads"] == 1
    result = runner.invoke(app, ["verify", str(src), str(dst), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "select" and "kl" in report["baseline_random_init"]


# ---- training evidence ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    """A small Llama trained on the standard library, with its BPE tokenizer (built once per session)."""
    import trained_models as T

    return T.build_trained(tmp_path_factory.mktemp("trained"), T.TEST)


SMALL = dict(hidden=32, ffn=96, heads=2, kv_heads=1, layers=2)  # from 64 / 192 / 4 / 2 / 4
FINETUNE_STEPS = 50  # the margins this asks for, at source seeds 0-2: trained_models.TEST


def test_shrunk_models_train_better_than_random_init(trained_dir, tmp_path):
    import transformers
    import trained_models as T

    task = T.language_task(trained_dir, T.TEST)
    source_loss = T.loss(load_model(trained_dir, "transformers"), task)
    finals, starts = {}, {}
    for method in ("select", "subclone"):
        dst = tmp_path / method
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the tokenizer is there: calibration must use real tokens
            extra = {"calibration_tokens": 4096} if method == "subclone" else {}
            grow.shrink(trained_dir, dst, method=method, **extra, **SMALL)
        result = runner.invoke(app, ["verify", str(trained_dir), str(dst), "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["loss_source"] < report["loss_target"] < report["baseline_random_init"]["loss"]
        assert report["kl"] < report["baseline_random_init"]["kl"] and report["beats_random_init"] is True
        model = load_model(dst, "transformers")
        starts[method] = T.loss(model, task)
        T.train(model, task, T.TEST, FINETUNE_STEPS, seed=1)
        finals[method] = T.loss(model, task)
    torch.manual_seed(1)
    random_init = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(dst)))
    starts["random"] = T.loss(random_init, task)
    T.train(random_init, task, T.TEST, FINETUNE_STEPS, seed=1)
    finals["random"] = T.loss(random_init, task)
    print(f"\nsource {source_loss:.3f}; step 0: {starts}; after {FINETUNE_STEPS} steps: {finals}")
    assert source_loss < finals["random"] - 0.5  # the source learned something worth keeping
    for method in ("select", "subclone"):
        assert starts[method] < starts["random"] - 0.5, (method, starts)
        assert finals[method] < finals["random"] - 0.3, (method, finals)


def test_calibration_inputs(trained_dir, model_dir, tmp_path):
    """Text through the source's own tokenizer from a file or folder; images from a folder for timm;
    a calibration file for a model without a tokenizer is refused."""
    import sysconfig

    from PIL import Image

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    view = ModelView(Source(trained_dir))
    ids, description, notes = calibrate.token_batch(view, stdlib / "argparse.py", 512)
    assert ids.shape == (4, 128) and "argparse.py" in description and not notes
    assert ids.max() < view.sizes["vocab"] and len(ids.unique()) > 100  # real text, not one repeated token
    folder = tmp_path / "text"
    folder.mkdir()
    (folder / "a.txt").write_text((stdlib / "bisect.py").read_text())
    imp = calibrate.importance(view, calibration=folder, tokens=256)
    plan = subclone.build(view, importance=imp, ffn=96, calibration=folder, calibration_tokens=256)
    assert plan.options["calibration"] == str(folder) and plan.options["calibration_tokens"] == 256
    assert any(str(folder) in n for n in plan.notes)
    with pytest.raises(grow.UsageError, match="--calibration needs the source's tokenizer"):
        calibrate.token_batch(ModelView(Source(model_dir("llama"))), folder, 512)
    images = tmp_path / "images"
    images.mkdir()
    gen = torch.Generator().manual_seed(0)
    for k in range(3):
        pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{k}.png")
    x, description, notes = calibrate.image_batch(ModelView(Source(model_dir("vit"))), images, 10_000)
    assert x.shape == (3, 3, 32, 32) and "3 images" in description and not notes
    assert -1.01 <= x.min() and x.max() <= 1.01  # normalised with the model's mean and std


def test_cli_warns_about_random_calibration_tokens(model_dir, tmp_path):
    args = ["shrink", str(model_dir("llama")), "--method", "subclone", "--hidden", "36", "--dry-run",
            "--calibration-tokens", "256"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "warning: the source has no tokenizer" in " ".join(result.stderr.split())
    assert "random tokens" in result.stdout  # also a note of the plan
    quiet = runner.invoke(app, [*args, "--quiet"])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr
