"""MSG: grown weights plus masks; with the masks at alpha = 0 the model is the source (every
architecture, each growable dimension); a training loop ramps alpha and the new parts learn."""

import json

import pytest
import torch
from typer.testing import CliRunner

import grow
from conftest import timm_case
from grow.cli import app
from grow.runtime import load_masks
from grow.verify import compare, load_model, run, sample_inputs

CASES = [
    ("llama", False, dict(hidden=120, ffn=150, heads=12, layers=4)),
    ("llama_mqa", False, dict(heads=12)),  # one kv head -> 2
    ("mistral", False, dict(ffn=150)),
    ("qwen2", False, dict(layers=4)),
    ("qwen3", True, dict(hidden=64, heads=6)),
    ("gpt2", True, dict(hidden=60, ffn=250, layers=3)),
    timm_case("vit", False, dict(hidden=64, ffn=250, layers=3)),
]


@pytest.mark.parametrize("kind,tied,sizes", CASES)
def test_msg_with_masks_is_exact(model_dir, tmp_path, kind, tied, sizes):
    src, dst = model_dir(kind, tied), tmp_path / "out"
    report = grow.expand(src, dst, method="msg", verify=True, ramp_steps=50, **sizes)["verification"]
    assert report["passed"] and report["rel_error"] <= 1e-4, report
    recipe = json.loads((dst / "grow.json").read_text())
    assert recipe["method"] == "msg" and recipe["exact"] is True
    masks = json.loads((dst / "msg_masks.json").read_text())
    assert {g["dimension"] for g in masks["growths"]} >= set(sizes)
    assert [g["start_step"] for g in masks["growths"]] == [50 * i for i in range(len(masks["growths"]))]
    # the weights alone are not the source: the masks are what makes it exact
    framework = "timm" if kind == "vit" else "transformers"
    x = sample_inputs(json.loads((src / "config.json").read_text()), framework, 0, vocab=100)
    plain = compare(run(load_model(src, framework), x, framework), run(load_model(dst, framework), x, framework))
    assert plain["rel_error"] > 1e-3


def test_training_ramps_alpha_and_new_parts_learn(model_dir, tmp_path):
    src, dst = model_dir("llama"), tmp_path / "out"
    grow.expand(src, dst, method="msg", hidden=120, ffn=150, heads=12, layers=4, ramp_steps=2)
    source, model = load_model(src, "transformers"), load_model(dst, "transformers").train()
    masks = load_masks(dst).attach(model)
    assert [g["dimension"] for g in masks.growths] == ["ffn", "heads", "hidden", "layers"]
    new_layer = masks.growths[3]["layers"][0]
    layers = model.model.layers
    new_parts = {  # name -> (parameter, slice of the new entries)
        "ffn": (layers[0].mlp.down_proj.weight, (slice(None), slice(112, None))),
        "heads": (layers[0].self_attn.o_proj.weight, (slice(None), slice(72, None))),
        "hidden": (model.model.embed_tokens.weight, (slice(None), slice(72, None))),
        "layers": (layers[new_layer].mlp.up_proj.weight, (slice(None), slice(None))),
    }
    ids = torch.randint(0, 160, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        source_loss = source(ids, labels=ids).loss.item()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    alphas, losses, got_grad = [], [], {k: [] for k in new_parts}
    for _ in range(8):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        for k, (p, where) in new_parts.items():
            got_grad[k].append(bool(p.grad[where].abs().sum() > 0))
        opt.step()
        masks.step()
        alphas.append(masks.alphas)
    assert losses[0] == pytest.approx(source_loss, rel=1e-5)  # step 0: the grown model is the source
    assert alphas[0] == [0.5, 0, 0, 0] and alphas[1] == [1, 0, 0, 0] and alphas[2] == [1, 0.5, 0, 0]
    assert alphas[6] == [1, 1, 1, 0.5] and alphas[7] == [1, 1, 1, 1] and masks.done
    # while a growth is masked its new parts get no gradient; once its alpha is above 0 they do
    for g, k in enumerate(["ffn", "heads", "hidden", "layers"]):
        assert not any(got_grad[k][: 2 * g + 1]) and all(got_grad[k][2 * g + 1:]), (k, got_grad[k])
    with torch.no_grad():
        ramped = model(ids).logits
        masks.detach()
        torch.testing.assert_close(model(ids).logits, ramped)  # at alpha = 1 the masks change nothing


def test_bad_msg_options_are_refused(model_dir, tmp_path):
    runner = CliRunner()
    src, dst = str(model_dir("qwen2")), str(tmp_path / "out")
    result = runner.invoke(app, ["expand", src, dst, "--method", "msg", "--ffn", "200", "--ramp-steps", "0"])
    assert result.exit_code == 2 and "--ramp-steps" in result.output
    result = runner.invoke(app, ["expand", src, dst, "--method", "msg", "--heads", "5"])
    assert result.exit_code == 2 and "multiple of 2" in result.output
    result = runner.invoke(app, ["expand", src, dst, "--method", "lemon", "--layers", "3", "--ramp-steps", "9"])
    assert result.exit_code == 2 and "--ramp-steps does not apply to --method lemon" in " ".join(result.output.split())
