"""grow verify runs both models layer by layer: the same verdicts as whole models, memory bounded by a
module, the error after every layer (naming where a broken output parts), and a run in the output's dtype."""

import gc
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import grow
import grow.layerwise as layerwise
from conftest import timm_case
from grow.cli import app
from grow.verify import compare, load_model, run, sample_inputs

runner = CliRunner()


def _tamper(path, name, amount):
    tensors = load_file(str(path / "model.safetensors"))
    tensors[name][0, :5] += amount
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("kind,tied", [("llama", True), ("gpt2", True), timm_case("vit", False)])
def test_layerwise_outputs_equal_whole_model_outputs(model_dir, tmp_path, kind, tied):
    src, dst = model_dir(kind, tied), tmp_path / "out"
    grow.expand(src, dst, factor=2)
    report = grow.verify(src, dst)
    assert report["passed"] and report["first_divergent_layer"] is None
    assert len(report["layers"]) == 3 and all(r["rel_error"] < 1e-5 for r in report["layers"])
    # the layer-by-layer outputs are the ones the whole model gives
    framework = "timm" if kind == "vit" else "transformers"
    config = json.loads((src / "config.json").read_text())
    x = sample_inputs(config, framework, 0, vocab=160)
    whole = compare(run(load_model(src, framework), x, framework), run(load_model(dst, framework), x, framework))
    assert report["rel_error"] == pytest.approx(whole["rel_error"], rel=0.2, abs=1e-7)
    params = sum(t.numel() * 4 for t in load_file(str(dst / "model.safetensors")).values())
    assert 0 < report["peak_layer_bytes"] < params / 3


def test_failed_check_names_the_first_layer_that_parts(model_dir, tmp_path):
    dst = tmp_path / "out"
    grow.expand(model_dir("llama"), dst, factor=2)
    _tamper(dst, "model.layers.1.mlp.down_proj.weight", 0.5)
    r = runner.invoke(app, ["verify", str(model_dir("llama")), str(dst), "--json"])
    assert r.exit_code == 3
    report = json.loads(r.stdout)
    assert report["first_divergent_layer"] == 1
    errors = [e["rel_error"] for e in report["layers"]]
    assert errors[0] < 1e-5 and errors[1] < 1e-5 and errors[2] > 1e-4  # embeddings, layer 0, layer 1
    assert "after layer 1" in report["failure"]


def test_depth_growth_pairs_each_layer_with_its_source_layer(model_dir, tmp_path):
    dst = tmp_path / "out"
    report = grow.expand(model_dir("llama"), dst, method="lemon", layers=4, verify=True)["verification"]
    assert report["passed"] and len(report["layers"]) == 5
    assert all(e["rel_error"] < 1e-5 for e in report["layers"])
    assert report["layers"][-1]["source_layer"] == 1


def test_chunked_head_and_embedding_give_the_same_report(model_dir, tmp_path, monkeypatch):
    """Linear and Embedding weights over CHUNK_BYTES run in row blocks; the result does not change."""
    src, dst = model_dir("llama", True), tmp_path / "out"
    grow.expand(src, dst, method="stack", layers=3)
    whole = grow.verify(src, dst)
    monkeypatch.setattr(layerwise, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(layerwise, "CHUNK_ROWS_MIN", 16)
    chunked = grow.verify(src, dst)
    for key in ("rel_error", "kl", "top1_agreement"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7)
    # a random model drawn block by block is another draw, but as far from the source
    assert chunked["baseline_random_init"]["rel_error"] > 0.5 and chunked["beats_random_init"]
    assert chunked["peak_layer_bytes"] < whole["peak_layer_bytes"]


def test_output_that_only_runs_in_float32_fails(model_dir, tmp_path):
    """A float16 output whose activations overflow float16 runs in float32 but not as users run it."""
    src, dst = model_dir("llama"), tmp_path / "out"
    grow.expand(src, dst, factor=2, dtype="float16")
    ok = grow.verify(src, dst)
    assert ok["dtype_check"]["dtype"] == "float16" and ok["dtype_check"]["ran"] is True
    tensors = load_file(str(dst / "model.safetensors"))
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        tensors[name] *= 3000  # gate * up leaves float16's range; float32 holds it
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    report = grow.verify(src, dst)
    assert report["dtype_check"]["ran"] is False and report["passed"] is False
    assert "float16" in report["failure"]
    r = runner.invoke(app, ["verify", str(src), str(dst)])
    assert r.exit_code == 3 and "float16" in r.output


def test_cuda_is_refused_without_a_gpu(model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = runner.invoke(app, ["verify", str(model_dir("llama")), str(model_dir("llama")), "--device", "cuda"])
    assert r.exit_code == 2 and "--device cuda" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_expand_with_verify_closes_every_file(model_dir, tmp_path, kind):
    """grow expand --verify reads both checkpoints; every file it opened is closed when it returns."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        grow.expand(model_dir(kind), tmp_path / "out", factor=2, verify=True)
        gc.collect()
    assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
