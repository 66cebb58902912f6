"""Every growth default leaves copies that separate under training: exact at step 0 (run in transformers
against the source), different after one AdamW step on real text. Without the symmetry breaking
(HyperCloning --no-noise) the copies of a unit stay identical, which is what the defaults avoid."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

import grow
from grow.verify import load_model
from tiny_models import VOCAB, loaded_expert, moe_block, save_language_model

TEXT = (Path(sysconfig.get_paths()["stdlib"]) / "inspect.py").read_bytes()[:20000]


def one_adamw_step(folder: Path):
    """The grown model after one AdamW step on a batch of stdlib text (bytes as token ids)."""
    torch.manual_seed(0)
    model = load_model(folder, "transformers")
    model.train()
    ids = torch.tensor(list(TEXT[: 4 * 64]), dtype=torch.long).clamp(max=VOCAB - 1).view(4, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(ids, labels=ids).loss.backward()
    opt.step()
    return model


def separation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference between two blocks that started as copies."""
    return ((a - b).norm() / a.norm()).item()


def halves(w: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = w.shape[axis] // 2
    return w.narrow(axis, 0, h).detach(), w.narrow(axis, h, h).detach()


def embedding_copies(model, width: int):
    e = model.model.embed_tokens.weight.detach()
    return e[:, :width], e[:, width:2 * width]


@pytest.mark.parametrize("method,options", [
    ("hypercloning", {"factor": 2}),
    ("lemon", {"hidden": 144, "ffn": 150, "layers": 3}),  # two copies of the residual; FFN units partly copied
])
def test_width_defaults_are_exact_and_copies_separate(model_dir, tmp_path, method, options):
    src, dst = model_dir("llama"), tmp_path / "out"
    report = grow.expand(src, dst, method=method, verify=True, **options)["verification"]
    assert report["passed"] and report["rel_error"] <= 1e-4, report
    recipe = json.loads((dst / "grow.json").read_text())
    assert recipe["exact"] is True and recipe["stats"]["symmetry_breaking"].startswith("element-wise split")
    model = one_adamw_step(dst)
    # the hidden copies of the embedding start equal and separate; so do the FFN units that are copies
    assert separation(*embedding_copies(model, 72)) > 1e-3
    up = model.model.layers[0].mlp.up_proj.weight.detach()
    assert separation(up[:38], up[112:150]) > 1e-3


def test_without_noise_hypercloning_copies_never_separate(model_dir, tmp_path):
    dst = tmp_path / "plain"
    result = grow.expand(model_dir("llama"), dst, factor=2, noise=False, verify=True)
    assert result["verification"]["passed"]
    assert json.loads((dst / "grow.json").read_text())["stats"]["symmetry_breaking"] == "none"
    model = one_adamw_step(dst)
    assert separation(*embedding_copies(model, 72)) == 0.0
    up = model.model.layers[0].mlp.up_proj.weight
    assert separation(*halves(up, 0)) == 0.0


def test_lemon_element_split_separates_more_than_column_split(model_dir, tmp_path):
    """Unequal column multiples give copied FFN units parallel gradients, which AdamW turns into equal
    updates; element-wise pieces do not."""
    seps = {}
    for split in ("element", "column"):
        dst = tmp_path / split
        grow.expand(model_dir("llama"), dst, method="lemon", hidden=144, ffn=224, split=split)
        up = one_adamw_step(dst).model.layers[0].mlp.up_proj.weight.detach()
        seps[split] = separation(up[:112], up[112:])
    assert seps["element"] > 10 * seps["column"], seps


def test_bf16_hypercloning_default_is_exact_and_verifies(tmp_path):
    src = save_language_model("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    for factor in (2, 3):
        dst = tmp_path / f"x{factor}"
        result = grow.expand(src, dst, factor=factor, verify=True)
        report = result["verification"]
        assert report["exact_expected"] is True and report["passed"], report
        assert json.loads((dst / "grow.json").read_text())["exact"] is True
        assert grow.inspect(dst)["dtype"] == "bfloat16"


@pytest.mark.parametrize("options", [{"experts": 4, "top_k": 2}, {"experts": 8, "top_k": 4, "granularity": 2}])
def test_upcycled_experts_are_exact_and_separate(model_dir, tmp_path, options):
    dst = tmp_path / "moe"
    report = grow.upcycle(model_dir("llama"), dst, verify=True, **options)["verification"]
    assert report["passed"] and report["rel_error"] <= 1e-4, report
    moe = moe_block(one_adamw_step(dst).model.layers[0])
    g = options.get("granularity", 1)
    width = json.loads((dst / "config.json").read_text())["intermediate_size"]
    # experts e and e + g hold the same FFN slice
    a, b = (loaded_expert(moe, e, width)[0].detach() for e in (0, g))
    assert torch.equal(a, b) is False and separation(a, b) > 1e-4


def test_stacked_layer_copies_separate(model_dir, tmp_path):
    dst = tmp_path / "stack"
    grow.expand(model_dir("llama"), dst, method="stack", layers=4)
    layers = one_adamw_step(dst).model.layers
    assert separation(layers[0].mlp.up_proj.weight.detach(), layers[2].mlp.up_proj.weight.detach()) > 1e-4
