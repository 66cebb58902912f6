"""Upcycled outputs run in their own dtype in transformers: expert widths the bf16 kernels cannot run
are refused with widths that work, and accepted bf16 outputs run a forward pass as users run them."""

import warnings

import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from grow.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def llama_688(tmp_path_factory):
    """A bf16 Llama with the demo model's FFN width (688 = 4 x 172): G = 4 gives 344-byte rows."""
    path = tmp_path_factory.mktemp("llama688")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=688, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=160)
    tf.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def logits(path, ids, dtype):
    model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    assert model.dtype == dtype
    with torch.no_grad():
        return model(ids).logits.float()


def test_expert_width_the_bf16_kernels_cannot_run_is_refused_with_what_works(llama_688, tmp_path):
    dst = tmp_path / "moe"
    r = runner.invoke(app, ["upcycle", str(llama_688), str(dst), "--experts", "16", "--top-k", "4",
                            "--granularity", "4"])
    assert r.exit_code == 2, r.output
    message = r.stderr.strip()
    assert message.startswith("error:") and "344 bytes" in message and "16 bytes" in message
    assert "--granularity 1 (width 688)" in message and "--granularity 2 (width 344)" in message
    assert "--dtype float32" in message and not dst.exists()
    # the float32 output of the same split runs
    r = runner.invoke(app, ["upcycle", str(llama_688), str(dst), "--experts", "16", "--top-k", "4",
                            "--granularity", "4", "--dtype", "float32"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("fmt, extra", [("mixtral", []), ("qwen2_moe", ["--shared-expert"]), ("qwen2_moe", ["--verify"])])
def test_bf16_output_runs_in_bf16(llama_688, tmp_path, fmt, extra):
    """The output loads in bfloat16 and its forward pass runs and stays close to the bf16 source; grow's
    own --verify of a Qwen2-MoE without a shared expert prints no torch warning about its empty module."""
    dst = tmp_path / "moe"
    granularity = "2" if fmt != "qwen2_moe" else "1"  # qwen2_moe: a shared slice plus one routed slice
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torch warning about empty tensors on the user's stderr either
        r = runner.invoke(app, ["upcycle", str(llama_688), str(dst), "--experts", "4", "--top-k", "2",
                                "--granularity", granularity, "--format", fmt, *extra])
    assert r.exit_code == 0, r.output
    assert "Warning" not in r.stderr
    ids = torch.randint(0, 160, (2, 12), generator=torch.Generator().manual_seed(0))
    out = logits(dst, ids, torch.bfloat16)
    ref = logits(llama_688, ids, torch.bfloat16)
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 0.05  # bf16 arithmetic in different kernels
