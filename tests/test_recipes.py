"""grow run: recipe files for batch jobs, and re-making an output from its grow.json."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from grow.cli import app

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def demo_stand_in(tmp_path_factory):
    """A working directory where a tiny bf16 tied Llama stands in for `make demo`'s .cache/demo/llama-small."""
    import torch
    from tiny_models import save_language_model

    cwd = tmp_path_factory.mktemp("repo")
    save_language_model("llama", cwd / ".cache/demo/llama-small", tied=True, dtype=torch.bfloat16)
    return cwd


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_recipe_runs_on_the_demo_model(demo_stand_in, monkeypatch, recipe):
    """Every recipe in configs/ runs as shipped (paths relative to the repository root), every job passes."""
    monkeypatch.chdir(demo_stand_in)
    jobs = yaml.safe_load((CONFIGS / recipe).read_text())["jobs"]
    r = runner.invoke(app, ["run", str(CONFIGS / recipe), "--json", "--force"])
    assert r.exit_code == 0, r.output
    results = json.loads(r.stdout)
    assert [x["command"] for x in results] == [j["command"] for j in jobs]
    for x in results:
        report = x if x["command"] == "verify" else x.get("verification")
        if report:
            assert report["passed"] and report["exact_expected"] and report["rel_error"] < 1e-4, report
    for job in jobs:
        assert (demo_stand_in / job["dst"] / "grow.json").is_file()


def test_progressive_recipe_grows_in_stages(demo_stand_in, monkeypatch):
    monkeypatch.chdir(demo_stand_in)
    runs = demo_stand_in / ".cache/demo/runs"
    if not (runs / "stage3-moe").exists():
        assert runner.invoke(app, ["run", str(CONFIGS / "progressive.yaml"), "--force"]).exit_code == 0
    stages = [json.loads((runs / s / "config.json").read_text()) for s in ("stage1-deep", "stage2-wide", "stage3-moe")]
    assert stages[0]["num_hidden_layers"] == 8 and stages[1]["hidden_size"] == 2 * stages[0]["hidden_size"]
    assert stages[2]["architectures"] == ["MixtralForCausalLM"] and stages[2]["num_local_experts"] == 8
    made = json.loads((runs / "stage2-wide" / "grow.json").read_text())
    assert made["source"]["id"].endswith("stage1-deep") and made["options"]["noise_snr_db"] == 30


def test_remake_from_grow_json_gives_identical_weights(model_dir, tmp_path):
    first = tmp_path / "first"
    assert runner.invoke(app, ["expand", str(model_dir("qwen2")), str(first), "--factor", "2",
                               "--noise-snr-db", "20", "--seed", "5"]).exit_code == 0
    again = tmp_path / "again"
    r = runner.invoke(app, ["run", str(first / "grow.json"), "--dst", str(again)])
    assert r.exit_code == 0, r.output
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_failing_job_is_named(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"jobs": [
        {"command": "expand", "src": str(model_dir("llama")), "dst": str(tmp_path / "a"), "factor": 2},
        {"command": "expand", "src": str(model_dir("llama")), "dst": str(tmp_path / "b"), "factor": 2.5},
    ]}))
    r = runner.invoke(app, ["run", str(recipe)])
    assert r.exit_code == 2
    assert "job 2" in r.stderr and "--factor" in r.stderr
    assert f"job 1 wrote {tmp_path / 'a'}" in r.stderr  # what completed, and where its output is
    assert (tmp_path / "a" / "model.safetensors").is_file() and not (tmp_path / "b").exists()


def test_unknown_keys_are_refused_with_the_closest_valid_key(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    for job, word, hint in [
        ({"command": "expand", "methd": "lemon", "layers": 4}, "'methd'", "'method'"),
        ({"command": "shrink", "hiden": 32}, "'hiden'", "'hidden'"),
        ({"command": "upcycle", "experts": 4, "topk": 2}, "'topk'", "'top_k'"),
        ({"command": "verify", "sed": 1}, "'sed'", "'seed'"),
    ]:
        recipe.write_text(yaml.safe_dump({"jobs": [{**job, "src": str(model_dir("llama")), "dst": str(tmp_path / "o")}]}))
        r = runner.invoke(app, ["run", str(recipe)])
        assert r.exit_code == 2, r.output
        assert "job 1" in r.stderr and word in r.stderr and f"did you mean {hint}" in r.stderr
        assert not (tmp_path / "o").exists()
    recipe.write_text(yaml.safe_dump({"defaults": {"sead": 1}, "jobs": [{"command": "verify", "src": "a", "dst": "b"}]}))
    r = runner.invoke(app, ["run", str(recipe)])
    assert r.exit_code == 2 and "'sead'" in r.stderr and "'seed'" in r.stderr
    recipe.write_text(yaml.safe_dump({"job": []}))
    r = runner.invoke(app, ["run", str(recipe)])
    assert r.exit_code == 2 and "'job'" in r.stderr and "'jobs'" in r.stderr


def test_run_force_replaces_existing_outputs(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    dst = tmp_path / "a"
    recipe.write_text(yaml.safe_dump({"jobs": [{"command": "expand", "src": str(model_dir("llama")), "dst": str(dst),
                                                "factor": 2}]}))
    assert runner.invoke(app, ["run", str(recipe)]).exit_code == 0
    r = runner.invoke(app, ["run", str(recipe)])
    assert r.exit_code == 1 and "--force" in r.stderr
    (dst / "stale.txt").write_text("old")
    assert runner.invoke(app, ["run", str(recipe), "--force"]).exit_code == 0
    assert not (dst / "stale.txt").exists() and (dst / "model.safetensors").is_file()


@pytest.mark.no_transformers
def test_bad_recipes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs: [{command: explode, src: a, dst: b}]")
    r = runner.invoke(app, ["run", str(bad)])
    assert r.exit_code == 2 and "job 1" in r.stderr and "command" in r.stderr
    bad.write_text("jobs: [")
    assert runner.invoke(app, ["run", str(bad)]).exit_code == 2
    bad.write_text("nothing: here")
    r = runner.invoke(app, ["run", str(bad)])
    assert r.exit_code == 2 and "'jobs'" in r.stderr


def test_failed_verification_stops_the_run_with_exit_3(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"jobs": [
        {"command": "expand", "src": str(model_dir("gpt2", True)), "dst": str(tmp_path / "a"), "factor": 2,
         "verify": True, "tol": 0.0},
        {"command": "expand", "src": str(model_dir("gpt2", True)), "dst": str(tmp_path / "b"), "factor": 2},
    ]}))
    r = runner.invoke(app, ["run", str(recipe)])
    assert r.exit_code == 3 and "job 1" in r.stderr
    assert not (tmp_path / "b").exists()
