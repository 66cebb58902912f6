"""grow run: recipe files for batch jobs, and re-making an output from its grow.json."""

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from grow.cli import app

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_example_recipe_runs(model_dir, tmp_path, monkeypatch):
    recipe = yaml.safe_load((CONFIGS / "hypercloning-2x.yaml").read_text())
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "llama-small").symlink_to(model_dir("llama"))
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["run", str(CONFIGS / "hypercloning-2x.yaml"), "--json"])
    assert r.exit_code == 0, r.output
    results = json.loads(r.stdout)
    assert [x["command"] for x in results] == [j["command"] for j in recipe["jobs"]]
    assert results[1]["passed"] and results[1]["rel_error"] < 1e-4
    made = json.loads((tmp_path / "checkpoints/llama-small-x2/grow.json").read_text())
    assert made["options"]["noise_snr_db"] == 30 and made["options"]["seed"] == 0


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
    assert (tmp_path / "a" / "model.safetensors").is_file() and not (tmp_path / "b").exists()


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
