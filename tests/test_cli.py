"""The grow command: every command, --json, --dry-run, exit codes, sharded output."""

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from grow.cli import app

runner = CliRunner()


def grow(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_inspect_json_uses_config_key_names(model_dir):
    r = grow("inspect", model_dir("llama"), "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["hidden_size"] == 72 and info["num_attention_heads"] == 9 and info["num_key_value_heads"] == 3
    assert info["head_dim"] == 8 and info["intermediate_size"] == 112 and info["num_hidden_layers"] == 2
    assert info["tie_word_embeddings"] is False and info["dtype"] == "float32"
    assert info["parameters"] > 0
    gpt2 = json.loads(grow("inspect", model_dir("gpt2", True), "--json").stdout)
    assert gpt2["n_embd"] == 48 and gpt2["n_head"] == 4 and gpt2["tie_word_embeddings"] is True
    vit = json.loads(grow("inspect", model_dir("vit"), "--json").stdout)
    assert vit["architecture"].startswith("vit_") and vit["embed_dim"] == 48 and vit["num_heads"] == 3


def test_inspect_table(model_dir):
    r = grow("inspect", model_dir("qwen3"))
    assert r.exit_code == 0 and "Qwen3ForCausalLM" in r.stdout and "head_dim" in r.stdout


def test_dry_run_writes_nothing(model_dir, tmp_path):
    dst = tmp_path / "out"
    r = grow("expand", model_dir("qwen2"), dst, "--factor", "2", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)["plan"]
    assert not dst.exists()
    assert plan["target_sizes"]["hidden"] == 128 and plan["source_sizes"]["hidden"] == 64
    names = {t["name"] for t in plan["tensors"]}
    assert "model.layers.1.self_attn.q_proj.bias" in names
    q = next(t for t in plan["tensors"] if t["name"] == "model.layers.0.self_attn.q_proj.weight")
    assert q["shape"] == [128, 128] and "element-wise split" in q["recipe"]
    table = grow("expand", model_dir("qwen2"), dst, "--factor", "2", "--dry-run")
    assert table.exit_code == 0 and "q_proj" in table.stdout and not dst.exists()


def test_expand_verify_json_and_shards(model_dir, tmp_path):
    dst = tmp_path / "out"
    r = grow("expand", model_dir("mistral"), dst, "--factor", "2", "--shard-size", "200KB", "--verify", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["verification"]["passed"] and result["verification"]["rel_error"] < 1e-4
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == result["files"]
    for shard in shards:  # every shard within the limit unless it holds one tensor larger than it
        with safe_open(str(dst / shard), "pt") as f:
            assert (dst / shard).stat().st_size <= 200_000 + 4096 or len(list(f.keys())) == 1
    assert not (dst / "model.safetensors").exists()
    assert (dst / "grow.json").is_file() and (dst / "README.md").is_file()
    # verify as its own command, JSON and table
    v = grow("verify", model_dir("mistral"), dst, "--json")
    assert v.exit_code == 0 and json.loads(v.stdout)["top1_agreement"] == 1.0
    assert grow("verify", model_dir("mistral"), dst).exit_code == 0


def test_verify_fails_on_tampered_output(model_dir, tmp_path):
    dst = tmp_path / "out"
    assert grow("expand", model_dir("llama"), dst, "--factor", "2").exit_code == 0
    path = dst / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.1.mlp.down_proj.weight"][0, :5] += 0.5
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    r = grow("verify", model_dir("llama"), dst, "--json")
    assert r.exit_code == 3
    report = json.loads(r.stdout)
    assert report["passed"] is False and report["rel_error"] > 1e-4


def test_expand_verify_flag_exits_3_when_tolerance_cannot_be_met(model_dir, tmp_path):
    r = grow("expand", model_dir("llama"), tmp_path / "out", "--factor", "2", "--verify", "--tol", "0")
    assert r.exit_code == 3


def test_console_script_and_module_entry(model_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "grow", "inspect", str(model_dir("llama")), "--json"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["hidden_size"] == 72
    assert r.stderr == ""  # nothing on stderr when it is not a terminal


def test_verify_refuses_models_that_cannot_be_compared(model_dir, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(model_dir("llama"), other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] = 200  # the weights no longer fit: transformers refuses to load it
    (other / "config.json").write_text(json.dumps(cfg))
    r = grow("verify", model_dir("llama"), other)
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "cannot load" in r.stderr
    assert "Traceback" not in r.output
    import transformers as tf

    wider_vocab = tmp_path / "vocab200"
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       vocab_size=200)).save_pretrained(wider_vocab)
    r = grow("verify", model_dir("llama"), wider_vocab)
    assert r.exit_code == 1 and "cannot be compared" in r.stderr and "Traceback" not in r.output
    r = grow("verify", model_dir("vit"), model_dir("vit"), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["rel_error"] == 0.0


def test_help_and_inspect_do_not_import_torch(model_dir):
    """grow --help and grow inspect stay fast: neither loads torch nor transformers, and `grow inspect SRC`,
    run as the `grow` command runs it, not pydantic either (typer loads it to parse other command lines)."""
    code = (
        "import sys\n"
        "from grow.cli import _plain_inspect, app, main\n"
        "run = main if _plain_inspect(sys.argv[1:]) else app\n"
        "try:\n"
        "    run()\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "heavy = ('torch', 'transformers', 'timm') + (('pydantic',) if run is main else ())\n"
        "print('imported:', [m for m in heavy if m in sys.modules])\n"
    )
    src = str(model_dir("llama"))
    for args in (["--help"], ["expand", "--help"], ["inspect", src, "--json"], ["inspect", src], ["inspect", "--help"]):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.endswith("imported: []\n"), (args, r.stdout[-300:])
        assert args[1:2] != [src] or "72" in r.stdout


def test_inspect_prints_what_typer_would(model_dir, tmp_path):
    """`grow inspect SRC [--json] [--debug]` is run without typer's parser: the same output, errors and exit
    codes as through it; any other command line goes to typer."""
    from grow.cli import _plain_inspect

    src = str(model_dir("gpt2", True))
    for args in ([src], [src, "--json"], ["--json", src, "--debug"], [str(tmp_path / "nowhere")],
                 [str(tmp_path / "nowhere"), "--json"]):
        assert _plain_inspect(["inspect", *args]) is not None
        direct = subprocess.run([sys.executable, "-m", "grow", "inspect", *args], capture_output=True, text=True)
        typer = subprocess.run([sys.executable, "-c", "from grow.cli import app; app()", "inspect", *args],
                               capture_output=True, text=True)
        assert (direct.returncode, direct.stdout, direct.stderr) == (typer.returncode, typer.stdout, typer.stderr)
        assert direct.returncode == (0 if src in args else 1), direct.stderr
    for run in (["-m", "grow"], ["-c", "from grow.cli import app; app()"]):  # a reader that stops at once (| head)
        child = subprocess.Popen([sys.executable, *run, "inspect", src, "--json"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        child.stdout.close()
        with child.stderr:
            assert (child.wait(), child.stderr.read()) == (1, b""), run
    for args in (["inspect"], ["inspect", "--help"], ["inspect", src, src], ["inspect", src, "--quiet"],
                 ["inspect", "--", src], ["inspect", src, "--json", "--json"], ["expand", src], []):
        assert _plain_inspect(args) is None, args


def test_api_functions_stay_functions_after_their_modules_load(model_dir):
    """grow.verify is the function even once the module grow.verify has been imported (lazily)."""
    code = ("import grow, inspect\nfrom grow.verify import load_model\nassert inspect.isfunction(grow.verify)\n"
            "grow.verify.__call__\nassert inspect.isfunction(grow.verify)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import grow

    assert grow.DEFAULT_TOL == grow.api.DEFAULT_TOL and callable(grow.verify)


@pytest.mark.no_transformers
def test_version_and_short_help():
    import grow

    r = grow_cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"grow {grow.__version__}"
    for args in (["-h"], ["expand", "-h"], ["run", "-h"]):
        r = grow_cli(*args)
        assert r.exit_code == 0 and "Usage:" in r.stdout


@pytest.mark.no_transformers
def test_help_reads_like_a_cli():
    """Options show a metavar that says what to give (N, SIZE, DTYPE), never a Python type label."""
    import re

    for command in ("", "inspect", "expand", "shrink", "upcycle", "verify", "run"):
        text = grow_cli(*([command] if command else []), "--help").stdout
        assert not re.search(r"<(bool|str|int|float)>", text), (command, text)
    text = grow_cli("expand", "--help").stdout
    assert "--factor N" in text and "--shard-size SIZE" in text and "--dtype DTYPE" in text and "SRC" in text


def grow_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_errors_under_json_are_json_on_stdout(model_dir, tmp_path):
    r = grow_cli("expand", model_dir("llama"), tmp_path / "out", "--json")
    assert r.exit_code == 2
    error = json.loads(r.stdout)
    assert error["exit_code"] == 2 and "--factor is required" in error["error"]
    r = grow_cli("inspect", tmp_path / "nowhere", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["exit_code"] == 1


def test_debug_shows_the_traceback_and_keeps_the_exit_code(model_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "grow", "expand", str(model_dir("llama")), str(tmp_path / "o"),
                        "--factor", "1.5", "--debug"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" in r.stderr and "UsageError" in r.stderr
    r = subprocess.run([sys.executable, "-m", "grow", "inspect", str(tmp_path / "nowhere"), "--debug"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_missing_factor_is_a_sentence(model_dir, tmp_path):
    r = grow_cli("expand", model_dir("llama"), tmp_path / "o")
    assert r.exit_code == 2
    assert "--factor is required" in r.stderr and "None" not in r.stderr and "--factor 2" in r.stderr


def test_verify_refuses_two_different_models(model_dir, tmp_path):
    r = grow_cli("verify", model_dir("qwen2"), model_dir("mistral"))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "Qwen2ForCausalLM" in r.stderr and "MistralForCausalLM" in r.stderr and "different models" in r.stderr
    made = tmp_path / "wide"
    assert grow_cli("expand", model_dir("qwen2"), made, "--factor", "2").exit_code == 0
    r = grow_cli("verify", model_dir("llama"), made)  # a Llama is not what the Qwen2 output was made from
    assert r.exit_code == 1 and f"made from {model_dir('qwen2')}" in r.stderr and "Traceback" not in r.output


@pytest.mark.filterwarnings("ignore::grow.errors.GrowWarning")
def test_progress_has_a_line_per_stage_and_seconds_include_calibration(model_dir, tmp_path):
    import time

    import grow

    seen: dict[str, list] = {}

    def progress(stage, done, total):
        seen.setdefault(stage, []).append((time.perf_counter(), done, total))

    start = time.perf_counter()
    result = grow.shrink(model_dir("llama"), tmp_path / "s", method="subclone", hidden=63, calibration_tokens=256,
                         verify=True, progress=progress)
    assert {"calibrating", "writing", "hashing", "verifying"} <= set(seen), seen.keys()
    for stage, calls in seen.items():  # each stage ends complete
        assert calls[-1][1] == calls[-1][2], (stage, calls[-1])
    assert seen["calibrating"][-1][2] == 2  # one step per layer
    calibration_began = seen["calibrating"][0][0]
    writing_ended = seen["writing"][-1][0]
    assert result["seconds"] >= writing_ended - calibration_began
    assert result["seconds"] <= time.perf_counter() - start


def test_rounding_only_inexact_output_says_so_with_the_fix(tmp_path):
    """LEMON on a bf16 source is exact in float32; the screen and the model card say that, not 'by design'."""
    import torch
    from tiny_models import save_language_model

    src = save_language_model("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    r = grow_cli("expand", src, tmp_path / "big", "--method", "lemon", "--hidden", "90")
    assert r.exit_code == 0, r.output
    assert "round in 16 bits" in r.stdout and "--dtype float32" in r.stdout
    card = (tmp_path / "big" / "README.md").read_text()
    assert "not function-preserving by design" not in card and "--dtype float32" in card
    assert "`grow expand` with method lemon" in card
    r = grow_cli("upcycle", src, tmp_path / "moe", "--experts", "4", "--top-k", "2")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "moe" / "README.md").read_text()
    assert "--method moe" not in card and "`grow upcycle`" in card
