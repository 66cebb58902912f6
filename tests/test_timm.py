"""timm folders as save_for_hf writes them (sizes from the architecture's registered defaults, overrides
in model_args), and the ViT variants: DeiT's distillation token and head, register tokens without a class
token, average pooling with fc_norm, layer scale. Every output is run in real timm."""

import json

import pytest
import timm
import torch

import grow
from grow.errors import UsageError
from grow.verify import compare, load_model, run, sample_inputs

TIMM = ["vit_defaults", "deit_distilled", "vit_reg"]
# (kind, method, options): exact growth
EXACT = [
    ("vit_defaults", "hypercloning", dict(factor=2)),
    ("deit_distilled", "hypercloning", dict(factor=2, noise_snr_db=20.0)),
    ("vit_reg", "hypercloning", dict(factor=3, ffn_factor=2)),
    ("vit_defaults", "lemon", dict(hidden=96, ffn=250, layers=8)),  # not a multiple: average expansion
    ("deit_distilled", "lemon", dict(hidden=384, layers=3)),
    ("vit_reg", "lemon", dict(hidden=128, ffn=200, layers=10)),  # layer scale: whole copies
    ("vit_reg", "msg", dict(hidden=96, ffn=250, layers=9)),
    ("deit_distilled", "msg", dict(hidden=256, heads=4, layers=3)),
]


def _config(path):
    return json.loads((path / "config.json").read_text())


def _timm(path):
    """The folder as users load it: timm.create_model("local-dir:...", pretrained=True)."""
    return timm.create_model(f"local-dir:{path}", pretrained=True).eval()


def test_fixtures_are_what_save_for_hf_writes(model_dir):
    """No size in model_args where the user gave none: grow reads them as timm does."""
    for kind in TIMM:
        args = _config(model_dir(kind))["model_args"]
        assert not {"embed_dim", "num_heads", "mlp_ratio"} & set(args), args
    assert "depth" not in _config(model_dir("vit_defaults"))["model_args"]
    assert _config(model_dir("deit_distilled"))["model_args"]["depth"] == 2  # an override is kept
    sizes = grow.inspect(model_dir("vit_defaults"))
    assert (sizes["embed_dim"], sizes["depth"], sizes["num_heads"], sizes["ffn"]) == (64, 6, 2, 192)
    sizes = grow.inspect(model_dir("deit_distilled"))
    assert (sizes["embed_dim"], sizes["depth"], sizes["num_heads"]) == (192, 2, 3)


@pytest.mark.parametrize("kind,method,options", EXACT)
def test_exact_growth_of_timm_folders(model_dir, tmp_path, kind, method, options):
    src, dst = model_dir(kind), tmp_path / "out"
    report = grow.expand(src, dst, method=method, verify=True, **options)["verification"]
    assert report["passed"] and report["exact_expected"] and report["rel_error"] <= 1e-4, report
    target = grow.expand(src, method=method, dry_run=True, **options)["plan"]["target_sizes"]
    model, cfg = _timm(dst), _config(dst)
    # every size that changed is in model_args, so the folder builds without grow
    assert model.embed_dim == target["hidden"] == cfg["model_args"]["embed_dim"] == cfg["num_features"]
    assert len(model.blocks) == target["layers"]
    assert model.blocks[0].attn.num_heads == target["heads"]
    assert model.blocks[0].mlp.fc1.out_features == target["ffn"]
    assert type(model) is type(_timm(src))


def test_distilled_and_register_tokens_are_grown(model_dir, tmp_path):
    deit, reg = tmp_path / "deit", tmp_path / "reg"
    grow.expand(model_dir("deit_distilled"), deit, factor=2)
    grow.expand(model_dir("vit_reg"), reg, factor=2)
    d, r = _timm(deit), _timm(reg)
    assert d.dist_token.shape[-1] == d.head_dist.in_features == 384
    assert r.cls_token is None and r.reg_token.shape[-1] == 128 and r.fc_norm.weight.shape == (128,)
    assert r.blocks[0].ls1.gamma.shape == (128,)


def test_outputs_run_in_their_own_dtype(model_dir, tmp_path):
    """An output written in bfloat16 runs in bfloat16 in timm and stays close to the source."""
    for kind in TIMM:
        src, dst = model_dir(kind), tmp_path / kind
        grow.expand(src, dst, factor=2, dtype="bfloat16")
        assert grow.inspect(dst)["dtype"] == "bfloat16"
        model = _timm(dst).to(torch.bfloat16)
        x = sample_inputs(_config(src), "timm", 0)
        with torch.no_grad():
            out = model(x.to(torch.bfloat16)).float()
        r = compare(run(load_model(src, "timm"), x, "timm"), out)
        assert r["rel_error"] < 0.05 and r["top1_agreement"] == 1.0, (kind, r)


def test_lemon_refuses_extra_entries_under_layer_scale(model_dir):
    with pytest.raises(UsageError, match="layer scale.*--hidden 128"):
        grow.expand(model_dir("vit_reg"), method="lemon", hidden=96, dry_run=True)


LOSSY = [("vit_defaults", "select"), ("deit_distilled", "subclone"), ("vit_reg", "select"), ("vit_reg", "subclone"),
         ("vit_reg", "stack")]


@pytest.mark.filterwarnings("ignore:no --calibration images")
@pytest.mark.parametrize("kind,method", LOSSY)
def test_lossy_operators_on_timm_folders(model_dir, tmp_path, kind, method):
    src, dst = model_dir(kind), tmp_path / method
    s = grow.inspect(src)
    if method == "stack":
        result = grow.expand(src, dst, method="stack", layers=s["depth"] + 2, verify=True)
    else:
        result = grow.shrink(src, dst, method=method, hidden=s["head_dim"], heads=1, ffn=s["ffn"] // 2, layers=1,
                             verify=True)
    report = result["verification"]
    assert report["passed"] and not report["exact_expected"] and "baseline_random_init" in report
    model = _timm(dst)
    assert torch.isfinite(run(model, sample_inputs(_config(src), "timm", 0), "timm")).all()
    if method != "stack":
        assert model.embed_dim == s["head_dim"] and len(model.blocks) == 1 and model.blocks[0].attn.num_heads == 1
        assert _config(dst)["model_args"]["depth"] == 1
    else:
        assert len(model.blocks) == s["depth"] + 2
