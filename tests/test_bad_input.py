"""Bad input: one clear sentence, a non-zero exit (2 for usage, 1 otherwise), nothing written, source untouched."""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grow.cli import app

runner = CliRunner()


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(parent: Path) -> list:
    return [p.name for p in parent.iterdir() if ".grow-tmp-" in p.name or ".grow-old-" in p.name]


@pytest.fixture
def src(model_dir, tmp_path):
    """A private copy of a tiny Llama that a test may damage."""
    path = tmp_path / "src"
    shutil.copytree(model_dir("llama"), path)
    return path


def expand(src, dst, *extra):
    return runner.invoke(app, ["expand", str(src), str(dst), "--factor", "2", *map(str, extra)])


def assert_refused(result, code: int, *words: str):
    assert result.exit_code == code, result.output
    message = result.stderr.strip()
    assert message.startswith("error:") and "Traceback" not in result.output
    for w in words:
        assert w in message, message


def damage_and_expand(src, tmp_path, code, words, damage):
    damage(src)
    before = digest(src)
    dst = tmp_path / "out"
    assert_refused(expand(src, dst), code, *words)
    assert not dst.exists() and not leftovers(tmp_path)
    assert digest(src) == before


def test_missing_config(src, tmp_path):
    damage_and_expand(src, tmp_path, 1, ["config.json"], lambda p: (p / "config.json").unlink())


def test_invalid_config(src, tmp_path):
    damage_and_expand(src, tmp_path, 1, ["config.json", "not valid JSON"],
                      lambda p: (p / "config.json").write_text("{ not json"))


def test_unsupported_architecture(src, tmp_path):
    def damage(p):
        cfg = json.loads((p / "config.json").read_text())
        cfg["architectures"] = ["T5ForConditionalGeneration"]
        (p / "config.json").write_text(json.dumps(cfg))

    damage_and_expand(src, tmp_path, 1, ["T5ForConditionalGeneration", "LlamaForCausalLM", "GPT2LMHeadModel",
                                         "BertForMaskedLM", "vit_*"], damage)


def test_shape_disagrees_with_config(src, tmp_path):
    def damage(p):
        cfg = json.loads((p / "config.json").read_text())
        cfg["intermediate_size"] = 100
        (p / "config.json").write_text(json.dumps(cfg))

    damage_and_expand(src, tmp_path, 1, ["mlp", "shape", "config.json"], damage)


def test_truncated_safetensors(src, tmp_path):
    def damage(p):
        f = p / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])

    damage_and_expand(src, tmp_path, 1, ["model.safetensors", "truncated"], damage)


def test_corrupt_safetensors_header(src, tmp_path):
    def damage(p):
        f = p / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[8:40] = b"\xff" * 32
        f.write_bytes(bytes(data))

    damage_and_expand(src, tmp_path, 1, ["model.safetensors"], damage)


def test_index_names_missing_shard(model_dir, tmp_path):
    sharded = tmp_path / "sharded"
    assert expand(model_dir("llama"), sharded, "--shard-size", "100KB").exit_code == 0
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[1]
    damage_and_expand(sharded, tmp_path, 1, [missing, "missing"], lambda p: (p / missing).unlink())


@pytest.mark.parametrize("factor", ["1.5", "1", "0", "-2", "abc"])
def test_bad_factor_is_a_usage_error(src, tmp_path, factor):
    r = runner.invoke(app, ["expand", str(src), str(tmp_path / "out"), "--factor", factor])
    assert r.exit_code == 2, r.output
    if factor != "abc":  # "abc" is refused by the option parser itself
        assert "--factor" in r.stderr and "lemon" in r.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_method_and_foreign_option(src, tmp_path):
    r = runner.invoke(app, ["expand", str(src), str(tmp_path / "o"), "--method", "magic"])
    assert_refused(r, 2, "--method magic")
    r = runner.invoke(app, ["expand", str(src), str(tmp_path / "o"), "--factor", "2", "--dtype", "int8"])
    assert_refused(r, 2, "--dtype")
    r = runner.invoke(app, ["expand", str(src), str(tmp_path / "o"), "--factor", "2", "--shard-size", "lots"])
    assert_refused(r, 2, "--shard-size")


@pytest.mark.no_transformers
def test_a_bad_shard_size_is_refused_before_the_source_is_read(tmp_path):
    """An option that needs no model is checked before the source is opened (and before torch, which
    takes seconds to import, is loaded)."""
    r = runner.invoke(app, ["expand", str(tmp_path / "nowhere"), str(tmp_path / "o"), "--shard-size", "lots"])
    assert_refused(r, 2, "--shard-size")


@pytest.mark.no_transformers
def test_missing_source(tmp_path):
    assert_refused(expand(tmp_path / "nowhere", tmp_path / "out"), 1, "nowhere")


def test_existing_target_needs_force(src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert_refused(expand(src, dst), 1, "already exists", "--force")
    assert (dst / "keep.txt").read_text() == "mine"
    assert expand(src, dst, "--force").exit_code == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    assert not leftovers(tmp_path)


def test_target_inside_source(src):
    before = digest(src)
    assert_refused(expand(src, src / "bigger"), 2, "inside the source")
    assert_refused(expand(src, src), 2, "inside the source")
    assert not (src / "bigger").exists() and digest(src) == before


def _cli(*args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # as from a terminal: a suite started in the background (`make test &`) passes Ctrl-C on as ignored
    restore_ctrl_c = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    return subprocess.Popen([sys.executable, "-m", "grow", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=restore_ctrl_c, **kw)


@pytest.fixture(scope="module")
def big_src(tmp_path_factory):
    """A Llama large enough (about 100 MB out) that writing it takes a noticeable time."""
    import torch
    import transformers as tf

    path = tmp_path_factory.mktemp("big")
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=8000)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_leaves_nothing(big_src, tmp_path, sig, code, word):
    """Ctrl-C, or SIGTERM from a job scheduler or `kill`, while grow writes: no half-written folder stays."""
    before = digest(big_src)
    dst = tmp_path / "out"
    proc = _cli("expand", big_src, dst, "--factor", "3")
    deadline = time.time() + 900  # starting python and torch takes minutes on a loaded machine
    while not leftovers(tmp_path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert leftovers(tmp_path), "the run never started writing"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == code, err
    assert word in err and "Traceback" not in err
    assert not dst.exists() and not leftovers(tmp_path)
    assert digest(big_src) == before


def test_full_disk_leaves_nothing(big_src, tmp_path):
    """A small tmpfs stands in for a full disk; without permission to mount, a file-size limit does."""
    before = digest(big_src)
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0
    try:
        if mounted:
            proc = _cli("expand", big_src, mnt / "out", "--factor", "2")
        else:
            def limit():
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))

            proc = _cli("expand", big_src, mnt / "out", "--factor", "2", preexec_fn=limit)
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 1, err
        assert err.startswith("error:") and "Traceback" not in err and "nothing was written" in err
        assert list(mnt.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)])
    assert digest(big_src) == before


@pytest.mark.parametrize("call", [
    lambda src: __import__("grow").expand(src, dry_run=True, factor="two"),
    lambda src: __import__("grow").expand(src, dry_run=True, method="lemon", hidden="wide"),
    lambda src: __import__("grow").expand(src, dry_run=True, method="stack", layers=2.5),
    lambda src: __import__("grow").shrink(src, dry_run=True, hidden="sixty"),
    lambda src: __import__("grow").upcycle(src, dry_run=True, experts="eight", top_k=2),
])
def test_non_numeric_sizes_from_python_or_recipes_are_usage_errors(model_dir, call):
    import grow

    with pytest.raises(grow.UsageError, match="must be a whole number"):
        call(model_dir("llama"))


def test_shrink_refuses_sizes_transformers_would_refuse(model_dir, tmp_path):
    """A Llama's hidden size must be a multiple of its heads (transformers checks it on load)."""
    r = runner.invoke(app, ["shrink", str(model_dir("llama")), str(tmp_path / "s"), "--hidden", "70"])
    assert_refused(r, 2, "--hidden 63")
    assert not (tmp_path / "s").exists()


def test_target_that_cannot_be_created(src, tmp_path):
    """A target under a file, or where no folder can be made, is one sentence (exit 1), not a traceback."""
    (tmp_path / "a_file").write_text("x")
    assert_refused(expand(src, tmp_path / "a_file" / "x"), 1, "a_file is a file")
    assert_refused(expand(src, "/proc/grow-x"), 1, "cannot create /proc/grow-x")
    assert not leftovers(tmp_path)


def _interrupt_when(proc, ready, what: str) -> str:
    deadline = time.time() + 900
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert ready(), f"the run never reached {what}"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    return err


def test_ctrl_c_during_verify_says_the_output_is_complete(big_src, tmp_path):
    dst = tmp_path / "out"
    proc = _cli("expand", big_src, dst, "--factor", "2", "--verify")
    err = _interrupt_when(proc, lambda: (dst / "grow.json").is_file(), "verification")
    assert "interrupted" in err and f"{dst} is complete" in err and "nothing was written" not in err
    assert (dst / "model.safetensors").is_file() and not leftovers(tmp_path)


def test_ctrl_c_during_grow_verify_says_nothing_changed(model_dir, tmp_path):
    """grow verify is interrupted while it loads the models: it never wrote anything."""
    proc = _cli("verify", model_dir("llama"), model_dir("llama"))
    maps = Path(f"/proc/{proc.pid}/maps")
    err = _interrupt_when(proc, lambda: "libtorch" in maps.read_text(), "loading torch")
    assert "nothing was changed" in err and "nothing was written" not in err.replace("verify writes nothing", "")


def test_ctrl_c_in_a_later_job_names_the_jobs_that_completed(model_dir, big_src, tmp_path):
    import yaml

    first, second = tmp_path / "first", tmp_path / "second"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"jobs": [
        {"command": "expand", "src": str(model_dir("llama")), "dst": str(first), "factor": 2},
        {"command": "expand", "src": str(big_src), "dst": str(second), "factor": 3},
    ]}))
    proc = _cli("run", recipe)
    err = _interrupt_when(proc, lambda: any(".second.grow-tmp-" in p.name for p in tmp_path.iterdir()), "job 2")
    assert "job 2" in err and f"job 1 wrote {first}" in err
    assert (first / "model.safetensors").is_file() and not second.exists() and not leftovers(tmp_path)
