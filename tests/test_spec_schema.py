"""Spec files are validated data: every shipped spec loads, and a spec with a typo is refused with its
file and key named."""

import re

import pytest
import yaml

from grow.arch.schema import ROLES, SpecError
from grow.arch.spec import SPEC_DIR, all_specs, load_spec, load_specs

pytestmark = pytest.mark.no_transformers  # see tests/conftest.py


def test_every_shipped_spec_loads():
    specs = all_specs()
    assert {p.stem for p in SPEC_DIR.glob("*.yaml")} == {s.file.stem for s in specs}
    for spec in specs:
        assert spec.tensors and spec.spaces_of("hidden") and spec.layer_groups
        assert all(t.role in ROLES for t in spec.tensors)


def _llama() -> dict:
    return yaml.safe_load((SPEC_DIR / "llama.yaml").read_text())


def _qwen2_moe() -> dict:
    return yaml.safe_load((SPEC_DIR / "qwen2_moe.yaml").read_text())


def _convnext() -> dict:
    return yaml.safe_load((SPEC_DIR / "timm_convnext.yaml").read_text())


def _tensor(data: dict, suffix: str) -> dict:
    return next(t for t in data["tensors"] if t["name"].endswith(suffix))


def _typo_top(d):
    d["per_layers"] = d.pop("per_layer")


def _typo_size(d):
    d["sizes"]["ffn"] = {"kye": "intermediate_size"}


def _typo_role(d):
    _tensor(d, "input_layernorm.weight")["role"] = "nrom"


def _typo_tensor_key(d):
    _tensor(d, "q_proj.weight")["raeds"] = 1


def _typo_space(d):
    _tensor(d, "gate_proj.weight")["axes"] = ["fnn", "hidden"]


def _undefined_size(d):
    del d["sizes"]["ffn"]


def _undefined_default(d):
    d["sizes"]["head_dim"]["default"] = "hiden // heads"


def _undefined_check(d):
    d["size_checks"]["LlamaForCausalLM"] = ["hidden % head == 0"]


def _bad_reads(d):
    _tensor(d, "o_proj.weight")["reads"] = 2


def _bad_placeholder(d):
    _tensor(d, "o_proj.weight")["name"] = "model.layers.{layer}.self_attn.o_proj.weight"


def _moe_typo(d):
    d["moe_format"]["renormalise"] = d["moe_format"].pop("renormalize")


def _moe_nested_typo(d):
    d["moe_format"]["shared"]["routr"] = d["moe_format"]["shared"].pop("router")


def _moe_unknown_tensor(d):
    d["moe_format"]["router"] = "model.layers.{i}.mlp.router.weight"


def _bad_operation(d):
    d["operations"] = {"widen": ["hypercloning"]}


def _stage_without_depth(d):
    del d["sizes"]["layers{s}"]


def _stage_typo(d):
    _tensor(d, "mlp.fc2.weight")["axes"] = ["hidden{s}", "fnn{s}"]


def _no_stages(d):
    d["stages"] = 0


def _last_mirror_unstaged(d):
    d["sizes"]["hidden"]["last_mirror"] = ["num_features"]


def _legacy_unknown(d):
    d["legacy_names"] = {"norm.gamma": "norm.scale"}


def _wrong_type(d):
    d["single_file"] = 1


def _wrong_item_type(d):
    _tensor(d, "o_proj.weight")["reads"] = "one"


def _no_branch_fits(d):
    d["moe_format"]["renormalize"] = 3


CASES = [
    (_llama, _typo_top, "unknown key per_layers"),
    (_llama, _typo_size, "unknown key sizes.ffn.kye"),
    (_llama, _typo_role, "tensors[1] (model.layers.{i}.input_layernorm.weight).role"),
    (_llama, _typo_tensor_key, "unknown key tensors[2] (model.layers.{i}.self_attn.q_proj.weight).raeds"),
    (_llama, _typo_space, "(model.layers.{i}.mlp.gate_proj.weight).axes: unknown space fnn"),
    (_llama, _undefined_size, "(model.layers.{i}.mlp.down_proj.weight).axes: unknown space ffn"),
    (_llama, _undefined_default, "sizes.head_dim.default uses size hiden"),
    (_llama, _undefined_check, "size_checks.LlamaForCausalLM: 'hidden % head == 0' uses size head"),
    (_llama, _bad_reads, "o_proj.weight).reads: 2 is not one of its 2 axes"),
    (_llama, _bad_placeholder, "unknown placeholder {layer}"),
    (_qwen2_moe, _moe_typo, "unknown key moe_format.renormalise"),
    (_qwen2_moe, _moe_nested_typo, "unknown key moe_format.shared.routr"),
    (_qwen2_moe, _moe_unknown_tensor, "moe_format.router: model.layers.{i}.mlp.router.weight is not one of the tensors"),
    (_qwen2_moe, _bad_operation, "operations.widen"),
    (_convnext, _stage_without_depth, "sizes.layers{s}: missing; a spec with stages defines hidden{s} and layers{s}"),
    (_convnext, _stage_typo, "(stages.2.blocks.{i}.mlp.fc2.weight).axes: unknown space fnn2"),
    (_convnext, _no_stages, "stages: Input should be greater than or equal to 1"),
    (_llama, _legacy_unknown, "legacy_names.norm.gamma: no tensor name ends in norm.scale"),
    (_llama, _last_mirror_unstaged, "sizes.hidden.last_mirror: only a size written with {s}"),
    (_llama, _wrong_type, "single_file: Input should be a valid boolean (found 1)"),
    (_llama, _wrong_item_type, "o_proj.weight).reads: Input should be a valid integer (found 'one')"),
    (_qwen2_moe, _no_branch_fits, "moe_format.renormalize: Input should be 'always' or a mapping of keys (found 3)"),
]


@pytest.mark.parametrize("base,change,message", CASES, ids=[c[1].__name__.strip("_") for c in CASES])
def test_a_broken_spec_is_refused_with_file_and_key(tmp_path, base, change, message):
    data = base()
    change(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SpecError, match=re.escape(f"spec {path}: ")) as err:
        load_spec(path)
    assert message in str(err.value), str(err.value)


def test_unknown_role_lists_the_known_ones(tmp_path):
    data = _llama()
    _typo_role(data)
    (tmp_path / "llama.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as err:
        load_specs(tmp_path)
    assert "'nrom'" in str(err.value) and "'final_norm'" in str(err.value)


def test_two_specs_of_one_family_are_refused(tmp_path):
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text((SPEC_DIR / "gpt2.yaml").read_text())
    with pytest.raises(SpecError, match=r"b.yaml: family gpt2 is already defined by .*a.yaml"):
        load_specs(tmp_path)


def test_a_spec_that_is_not_a_mapping_or_not_yaml_is_refused(tmp_path):
    (tmp_path / "list.yaml").write_text("- family: x\n")
    with pytest.raises(SpecError, match="list.yaml: expected a mapping"):
        load_spec(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("family: [x\n")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_an_moe_spec_needs_top_k(tmp_path):
    data = yaml.safe_load((SPEC_DIR / "mixtral.yaml").read_text())
    del data["sizes"]["top_k"]
    (tmp_path / "mixtral.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match="sizes.top_k: missing; a spec with experts defines top_k"):
        load_spec(tmp_path / "mixtral.yaml")


def test_spec_for_picks_what_a_scan_of_every_validated_spec_picks():
    """spec_for matches on the files' architectures before validating only the one it returns: the same
    spec object as the first of all_specs() whose patterns match."""
    import fnmatch

    from grow.arch.spec import spec_for

    for spec in all_specs():
        for pattern in spec.architectures:
            arch = pattern.replace("*", "X").replace("?", "X")
            first = next(s for s in all_specs() if any(fnmatch.fnmatchcase(arch, p) for p in s.architectures))
            config = {"architecture": arch} if spec.framework == "timm" else {"architectures": [arch]}
            assert spec_for(config) is first, arch


def test_a_validated_spec_is_read_only():
    import dataclasses

    spec = next(s for s in all_specs() if s.family == "qwen2_moe")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.model.moe_format.router = "model.layers.{i}.mlp.other.weight"
    assert spec.model.moe_format.model_dump()["keys"]["experts"] == "num_experts"
