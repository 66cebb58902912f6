"""BERT-style encoders (BertForMaskedLM, a bare BertModel, RobertaForMaskedLM): post-LN blocks, the
masked-LM head with its own transform and tied decoder. Every output is loaded and run in transformers."""

import warnings

import pytest
import torch
import transformers

import grow
from grow.verify import model_entry, run, sample_inputs
from tiny_models import ENCODER_KINDS


def load_clean(path, dtype=torch.float32):
    """The model as transformers loads it, asserting that no weight was missing or left over."""
    auto = getattr(transformers, model_entry(path)["auto_class"])
    model, info = auto.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def outputs(path, dtype=torch.float32):
    model = load_clean(path, dtype)
    inputs = sample_inputs({}, "transformers", 0, vocab=160)
    return run(model, inputs, "transformers", model_entry(path)["output"])


@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_hypercloning_x2_is_exact(model_dir, tmp_path, kind):
    src = model_dir(kind)
    dst = tmp_path / "x2"
    report = grow.expand(src, dst, method="hypercloning", factor=2, verify=True)["verification"]
    assert report["passed"] and report["rel_error"] <= 1e-5, report
    # run layer by layer, read through the model's own head (or the hidden state itself) after every layer
    assert report["layer_by_layer"] and len(report["layers"]) == 1 + grow.inspect(src)["num_hidden_layers"]
    assert max(r["rel_error"] for r in report["layers"]) <= 1e-5 and report["first_divergent_layer"] is None
    ref, out = outputs(src), outputs(dst)
    if kind == "bert":  # the bare encoder's hidden states are two copies of the source's
        assert out.shape[-1] == 2 * ref.shape[-1]
        torch.testing.assert_close(out[..., :32], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[..., 32:], ref, rtol=1e-5, atol=1e-5)
    else:  # masked-LM logits over the same vocabulary
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # in the output's own 16-bit dtype, as users run it
    bf16 = tmp_path / "bf16"
    grow.expand(src, bf16, method="hypercloning", factor=2, dtype="bfloat16")
    low = outputs(bf16, torch.bfloat16)[..., : ref.shape[-1]].float()
    assert (low - ref).norm() / ref.norm() < 2e-2
    check = grow.verify(src, bf16)["dtype_check"]  # verify runs it in bfloat16 too
    assert check["ran"] and check["dtype"] == "bfloat16" and check["rel_error"] < 2e-2, check


@pytest.mark.parametrize("method,options", [("hypercloning", dict(factor=2)), ("lemon", dict(hidden=64, ffn=100, layers=3))])
def test_widened_copies_separate_after_one_step(model_dir, tmp_path, method, options):
    """The word embedding's two halves start as equal copies of the source's columns; the readers split
    into unequal pieces give them different gradients, so one AdamW step on masked-LM text sets them apart."""
    from grow.calibrate import masked_lm_inputs

    dst = tmp_path / method
    grow.expand(model_dir("bert_mlm"), dst, method=method, **options)
    model = load_clean(dst)  # eval mode: dropout would tell the copies apart by itself
    e = model.bert.embeddings.word_embeddings.weight
    assert torch.equal(e[:, :32], e[:, 32:64])
    torch.manual_seed(0)
    ids, labels = masked_lm_inputs(torch.randint(5, 160, (4, 32)), 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    e = e.detach()
    assert ((e[:, :32] - e[:, 32:64]).norm() / e[:, :32].norm()).item() > 1e-4


@pytest.mark.parametrize("kind", ["bert_mlm", "roberta_mlm"])
@pytest.mark.parametrize("method", ["select", "subclone"])
def test_shrinking_loads_and_beats_random(model_dir, tmp_path, kind, method):
    src = model_dir(kind)
    dst = tmp_path / method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # subcloning warns: no tokenizer, so random calibration tokens
        report = grow.shrink(src, dst, method=method, hidden=16, heads=2, ffn=24, layers=1, verify=True)["verification"]
    assert report["exact_expected"] is False and report["beats_random_init"], report
    assert outputs(dst).shape == outputs(src).shape  # masked-LM logits over the source's vocabulary
    sizes = grow.inspect(dst)
    assert (sizes["hidden_size"], sizes["num_attention_heads"], sizes["num_hidden_layers"]) == (16, 2, 1)


def test_bare_encoder_made_narrower_is_one_sentence(model_dir, tmp_path):
    with pytest.raises(grow.GrowError, match="narrower .* cannot be compared"):
        grow.shrink(model_dir("bert"), tmp_path / "n", method="select", hidden=16, heads=2, verify=True)
    report = grow.shrink(model_dir("bert"), tmp_path / "d", method="select", layers=1, ffn=24, verify=True)
    assert report["verification"]["beats_random_init"]


@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_msg_is_exact_with_its_masks(model_dir, tmp_path, kind):
    """Post-LN: the hidden-width masks sit on the norms that follow each residual add."""
    from grow.runtime import load_masks

    src, dst = model_dir(kind), tmp_path / "msg"
    report = grow.expand(src, dst, method="msg", hidden=48, ffn=72, layers=3, verify=True)["verification"]
    assert report["passed"] and report["rel_error"] <= 1e-5, report
    ref = outputs(src)
    inputs = sample_inputs({}, "transformers", 0, vocab=160)
    output = model_entry(dst)["output"]
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)]:
        model = load_clean(dst, dtype)
        unmasked = run(model, inputs, "transformers", output)[..., : ref.shape[-1]]
        assert (unmasked - ref).norm() / ref.norm() > 1e-2  # the new parts do change the function ...
        load_masks(dst).attach(model)
        masked = run(model, inputs, "transformers", output)[..., : ref.shape[-1]]
        assert (masked - ref).norm() / ref.norm() < tol, dtype  # ... until the masks hold them at alpha = 0


@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_lemon_post_ln_is_exact(model_dir, tmp_path, kind):
    """Width by whole multiples (heads and FFN units copied with unequal fan-out), depth by new layers
    that take over the closing LayerNorm of the layer before them."""
    src, dst = model_dir(kind), tmp_path / "lemon"
    result = grow.expand(src, dst, method="lemon", hidden=64, ffn=100, layers=5, verify=True)
    report = result["verification"]
    assert report["passed"] and report["rel_error"] <= 1e-5, report
    assert any("post-LN" in n for n in result["plan"]["notes"])
    ref = outputs(src)
    width = ref.shape[-1]  # logits, or the bare encoder's leading 32 hidden entries
    assert (outputs(dst)[..., :width] - ref).norm() / ref.norm() < 1e-5
    low = outputs(dst, torch.bfloat16)[..., :width].float()  # the output's own dtype is float32; bf16 as users may run it
    assert (low - ref).norm() / ref.norm() < 3e-2
    model = load_clean(dst)
    layers = model.base_model.encoder.layer
    # source layer 0 -> target 0, 1 (new); source 1 -> 2, 3, 4 (new): handed-on norms are the identity
    for i in (0, 2, 3):
        assert torch.equal(layers[i].output.LayerNorm.weight, torch.ones(64))
    for i in (1, 3, 4):
        assert torch.equal(layers[i].attention.output.LayerNorm.bias, torch.zeros(64))
        assert not layers[i].output.dense.weight.any()  # new layers write nothing before their closing norm


def test_lemon_post_ln_refuses_a_width_that_is_no_multiple(model_dir, tmp_path):
    with pytest.raises(grow.UsageError, match="not a multiple of the source's 32: in a post-LN model"):
        grow.expand(model_dir("bert_mlm"), tmp_path / "x", method="lemon", hidden=48)
    assert not (tmp_path / "x").exists()


def test_masked_lm_calibration_and_loss_use_the_mask_token(model_dir, tmp_path):
    """With the source's tokenizer, subcloning calibrates on text with every 7th token masked (what a
    masked LM saw in pretraining) and verify reports the masked-LM loss of both models."""
    import shutil
    import string

    src = tmp_path / "with_tokenizer"
    shutil.copytree(model_dir("bert_mlm"), src)
    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *string.punctuation]
    (src / "vocab.txt").write_text("\n".join(vocab) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tokenizer is there: no warning about random tokens
        result = grow.shrink(src, tmp_path / "sub", method="subclone", ffn=24, layers=1, calibration_tokens=1024,
                             verify=True)
    assert any("every 7th token masked" in n for n in result["plan"]["notes"])
    report = result["verification"]
    assert report["loss_source"] is not None and report["loss_target"] is not None
    assert report["baseline_random_init"]["loss"] is not None


def test_stacking_loads_and_beats_random(model_dir, tmp_path):
    report = grow.expand(model_dir("bert_mlm"), tmp_path / "g", method="stack", layers=4, verify=True)["verification"]
    assert report["exact_expected"] is False and report["beats_random_init"], report
    assert len(load_clean(tmp_path / "g").bert.encoder.layer) == 4


def test_legacy_gamma_beta_layernorm_names(model_dir, tmp_path):
    """Old BERT checkpoints name LayerNorm parameters gamma and beta, which transformers renames when it
    loads; grow reads them so too, and writes the current names."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "legacy"
    shutil.copytree(model_dir("bert_mlm"), src)
    tensors = load_file(src / "model.safetensors")
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in tensors.items()}
    assert sum(k.endswith(("LayerNorm.gamma", "LayerNorm.beta")) for k in legacy) >= 6
    save_file(legacy, src / "model.safetensors", metadata={"format": "pt"})
    torch.testing.assert_close(outputs(src), outputs(model_dir("bert_mlm")), rtol=0, atol=0)  # transformers reads them
    for method, options in (("hypercloning", dict(factor=2)), ("lemon", dict(layers=3))):
        dst = tmp_path / method
        report = grow.expand(src, dst, method=method, verify=True, **options)["verification"]
        assert report["passed"] and report["rel_error"] <= 1e-4, report
        names = load_file(dst / "model.safetensors").keys()
        assert "bert.embeddings.LayerNorm.weight" in names and not any(n.endswith(("gamma", "beta")) for n in names)
        load_clean(dst)
