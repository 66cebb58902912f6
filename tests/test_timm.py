"""timm folders as save_for_hf writes them (sizes from the architecture's registered defaults, overrides
in model_args), the ViT variants (DeiT's distillation token and head, register tokens without a class
token, average pooling with fc_norm, layer scale) and ConvNeXt (stages of their own width and depth).
Every output is run in real timm."""

import json

import pytest
import timm
import torch

import grow
from grow.errors import GrowError, UsageError
from grow.verify import compare, load_model, run, sample_inputs

pytestmark = pytest.mark.no_transformers  # see tests/conftest.py

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
    for kind in TIMM + ["convnext"]:
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


# ---- ConvNeXt: stages of their own width and depth, depthwise convolutions, LayerNorm over channels ----

def _widths(model):
    return [stage.blocks[0].conv_dw.out_channels for stage in model.stages]


def _depths(model):
    return [len(stage.blocks) for stage in model.stages]


def test_convnext_sizes_as_timm_reads_them(model_dir):
    assert "dims" not in _config(model_dir("convnext"))["model_args"]  # test_convnext's registered defaults
    sizes = grow.inspect(model_dir("convnext"))
    assert sizes["dims"] == [24, 32, 48, 64] and sizes["depths"] == [1, 2, 4, 2] and sizes["ffn"] == [96, 128, 192, 256]
    sizes = grow.inspect(model_dir("convnext_args"))
    assert sizes["dims"] == [16, 24, 32, 40] and sizes["depths"] == [1, 1, 2, 1]


@pytest.mark.parametrize("kind,options", [("convnext", dict(factor=2)), ("convnext_args", dict(factor=3, noise_snr_db=20.0))])
def test_convnext_hypercloning_is_exact(model_dir, tmp_path, kind, options):
    src, dst = model_dir(kind), tmp_path / "out"
    report = grow.expand(src, dst, verify=True, **options)["verification"]
    assert report["passed"] and report["exact_expected"] and report["rel_error"] <= 1e-4, report
    assert report["layer_by_layer"]
    n = options["factor"]
    a, b = _timm(src), _timm(dst)
    assert _widths(b) == [w * n for w in _widths(a)] == _config(dst)["model_args"]["dims"]
    assert _config(dst)["num_features"] == _widths(b)[-1] == b.num_features
    # a depthwise filter reads only its own channel: each copy is the source filter, never split or divided
    w, big = a.stages[2].blocks[0].conv_dw.weight, b.stages[2].blocks[0].conv_dw.weight
    assert all(torch.equal(big[k * w.shape[0]:(k + 1) * w.shape[0]], w) for k in range(n))
    # the downsampling conv reads the tiled channels of the stage before: its copies are unequal pieces
    down, wide = a.stages[2].downsample[1].weight, b.stages[2].downsample[1].weight
    pieces = wide[: down.shape[0]].unflatten(1, (n, down.shape[1]))
    assert not torch.equal(pieces[:, 0], pieces[:, 1])
    torch.testing.assert_close(pieces.sum(1), down, rtol=0, atol=1e-6)


def test_convnext_copies_separate_after_one_step(model_dir, tmp_path):
    """The depthwise filters start as equal copies (each reads only its own channel); the split readers
    around them give the copies different gradients, so one AdamW step sets them apart."""
    src, dst = model_dir("convnext"), tmp_path / "out"
    grow.expand(src, dst, factor=2)
    model = _timm(dst).train()
    torch.manual_seed(0)
    images = torch.randn(4, *model.pretrained_cfg["input_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.nn.functional.cross_entropy(model(images), torch.arange(4) % model.num_classes).backward()
    opt.step()
    w = model.stages[2].blocks[0].conv_dw.weight.detach()
    half = w.shape[0] // 2
    assert ((w[:half] - w[half:]).norm() / w[:half].norm()).item() > 1e-4


def test_convnext_bfloat16_source_grows_into_bfloat16(model_dir, tmp_path):
    """A bfloat16 ConvNeXt grown again stays bfloat16, and verify runs it in bfloat16."""
    half = tmp_path / "half"
    grow.expand(model_dir("convnext_args"), half, factor=2, dtype="bfloat16")
    report = grow.expand(half, tmp_path / "out", factor=2, verify=True)["verification"]
    assert grow.inspect(tmp_path / "out")["dtype"] == "bfloat16"
    assert report["passed"] and report["dtype_check"]["ran"] and report["dtype_check"]["top1_agreement"] == 1.0, report


@pytest.mark.parametrize("kind,layers", [("convnext", 14), ("convnext_args", [2, 1, 4, 3])])
def test_convnext_lemon_depth_is_exact(model_dir, tmp_path, kind, layers):
    src, dst = model_dir(kind), tmp_path / "out"
    report = grow.expand(src, dst, method="lemon", layers=layers, verify=True)["verification"]
    assert report["passed"] and report["exact_expected"] and report["rel_error"] <= 1e-4, report
    model = _timm(dst)
    assert _depths(model) == _config(dst)["model_args"]["depths"]
    if layers == 14:  # the new blocks spread over the stages in proportion to their depths
        assert _depths(model) == [2, 3, 6, 3]
        new = model.stages[0].blocks[1]  # a copy of block 0 that adds nothing to the residual
        assert not new.mlp.fc2.weight.any() and torch.equal(new.conv_dw.weight, model.stages[0].blocks[0].conv_dw.weight)
    else:
        assert _depths(model) == layers


def test_convnext_select_and_stack(model_dir, tmp_path):
    src = model_dir("convnext")
    small = tmp_path / "small"
    report = grow.shrink(src, small, method="select", hidden=12, layers=5, verify=True)["verification"]
    assert report["passed"] and not report["exact_expected"] and "baseline_random_init" in report
    model, a = _timm(small), _timm(src)
    assert _widths(model) == [12, 16, 24, 32] and _depths(model) == [1, 1, 2, 1]
    assert model.stages[1].blocks[0].mlp.fc1.out_features == 64
    # kept channels keep their weights (uniform: every second one), in every tensor of their stage
    torch.testing.assert_close(model.stages[1].downsample[1].weight, a.stages[1].downsample[1].weight[::2, ::2])
    plan = grow.shrink(src, method="select", hidden=[16, 16, 16, 16], dry_run=True)["plan"]
    assert [plan["target_sizes"][f"hidden{k}"] for k in range(4)] == [16, 16, 16, 16]
    stacked = tmp_path / "stacked"
    assert grow.expand(src, stacked, method="stack", layers=[2, 3, 5, 2], verify=True)["verification"]["passed"]
    assert _depths(_timm(stacked)) == [2, 3, 5, 2]


@pytest.mark.parametrize("call,message", [
    (lambda src: grow.expand(src, method="lemon", hidden=48, dry_run=True), "grows the depth.*hypercloning"),
    (lambda src: grow.expand(src, method="msg", layers=12, dry_run=True), "cannot expand.*--method msg; it can"),
    (lambda src: grow.shrink(src, method="subclone", hidden=12, dry_run=True), "shrink --method select"),
    (lambda src: grow.upcycle(src, dry_run=True), "cannot upcycle"),
    (lambda src: grow.expand(src, factor=2, ffn_factor=3, dry_run=True), r"always 4 \* hidden0.*leave out --ffn-factor"),
    (lambda src: grow.shrink(src, method="select", hidden=10, dry_run=True), "fractional"),
    (lambda src: grow.shrink(src, method="select", ffn=10, dry_run=True), "--ffn does not apply"),
    (lambda src: grow.expand(src, method="lemon", layers=[1, 2, 3, 2], dry_run=True), "stage 2 has 4"),
])
def test_convnext_refusals(model_dir, call, message):
    with pytest.raises(UsageError, match=message):
        call(model_dir("convnext"))


def test_convnext_variant_with_a_1x1_conv_mlp_is_named(tmp_path):
    """The small ConvNeXts (conv_mlp) hold their MLP as 1x1 convolutions: refused, naming the tensor."""
    from tiny_models import SMALL_IMAGES, save_timm

    src = save_timm("test_convnext", tmp_path / "conv_mlp", conv_mlp=True, data_config=SMALL_IMAGES)
    with pytest.raises(GrowError, match=r"mlp.fc1.weight in model.safetensors has 4 axes \[96, 24, 1, 1\] where the "
                                        "timm_convnext layout grow knows has 2; .* timm_convnext.yaml does not describe"):
        grow.inspect(src)


def test_convnext_outputs_remade_from_their_grow_json(model_dir, tmp_path):
    """grow.json records the per-stage sizes as options that grow takes again (one depth / width per stage)."""
    src = model_dir("convnext")
    for method, make in (("lemon", lambda dst: grow.expand(src, dst, method="lemon", layers=14)),
                         ("select", lambda dst: grow.shrink(src, dst, method="select", hidden=12, layers=5))):
        first, again = tmp_path / method, tmp_path / f"{method}_again"
        make(first)
        grow.run(first / "grow.json", dst=again)
        assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
