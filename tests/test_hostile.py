"""Hostile checkpoints: nothing outside SRC is read, no file can exhaust memory, every refusal is one
sentence with nothing written, and no code shipped with a checkpoint runs."""

import json
import math
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from grow.checkpoint import Source
from grow.cli import app

runner = CliRunner()
INDEX = "model.safetensors.index.json"


def expand(src, dst):
    return runner.invoke(app, ["expand", str(src), str(dst), "--factor", "2"])


def refused(result, *words):
    """Exit 1 or 2, one sentence on stderr naming `words`, no traceback."""
    message = result.stderr.strip()
    assert result.exit_code in (1, 2), result.output
    assert message.startswith("error:") and "\n" not in message and "Traceback" not in result.output, message
    for w in words:
        assert w in message, message
    return message


def nothing_written(parent: Path, dst: Path) -> bool:
    return not dst.exists() and not [p for p in parent.iterdir() if ".grow-" in p.name]


@pytest.fixture(scope="module")
def sharded(model_dir, tmp_path_factory):
    """The tiny Llama written as several shards with an index."""
    path = tmp_path_factory.mktemp("sharded") / "src"
    r = runner.invoke(app, ["expand", str(model_dir("llama")), str(path), "--factor", "2", "--shard-size", "60KB"])
    assert r.exit_code == 0, r.output
    assert (path / INDEX).is_file()
    return path


@pytest.fixture
def src(model_dir, tmp_path):
    path = tmp_path / "src"
    shutil.copytree(model_dir("llama"), path)
    return path


def header_of(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_header(path: Path, header_text: str, body: bytes) -> None:
    blob = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def set_weight_map(folder: Path, change) -> None:
    index = json.loads((folder / INDEX).read_text())
    change(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../outside.safetensors"])
def test_index_naming_a_file_outside_the_folder_is_refused(sharded, tmp_path, shard):
    src = tmp_path / "src"
    shutil.copytree(sharded, src)
    shutil.copy(src / "model-00001-of-00003.safetensors" if (src / "model-00001-of-00003.safetensors").exists()
                else next(src.glob("model-*.safetensors")), tmp_path / "outside.safetensors")
    set_weight_map(src, lambda m: m.update({next(iter(m)): shard}))
    refused(expand(src, tmp_path / "out"), INDEX, shard, "outside")
    assert nothing_written(tmp_path, tmp_path / "out")


def test_symlink_pointing_outside_the_folder_is_refused(src, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    (src / "model.safetensors").rename(outside)
    (src / "model.safetensors").symlink_to(outside)
    refused(expand(src, tmp_path / "out"), "model.safetensors", "outside")
    assert nothing_written(tmp_path, tmp_path / "out")
    (src / "model.safetensors").unlink()
    shutil.copy(outside, src / "model.safetensors")
    (src / "tokenizer.json").symlink_to("/etc/hostname")  # a companion file would be copied into DST
    refused(expand(src, tmp_path / "out"), "tokenizer.json", "outside")


def test_symlink_inside_the_folder_is_accepted(src, tmp_path):
    (src / "model.safetensors").rename(src / "weights.bin")
    (src / "model.safetensors").symlink_to("weights.bin")
    assert expand(src, tmp_path / "out").exit_code == 0


def test_huge_header_length_is_refused_before_it_is_read(src, tmp_path):
    f = src / "model.safetensors"
    data = f.read_bytes()
    # 4 GB claimed and present (sparse), so only the 100 MB limit can refuse it
    with open(f, "wb") as out:
        out.write(struct.pack("<Q", 4 << 30) + data[8:])
        out.truncate(8 + (4 << 30) + 16)
    refused(expand(src, tmp_path / "out"), "model.safetensors", "100 MB")
    assert nothing_written(tmp_path, tmp_path / "out")


def test_overlapping_data_ranges_are_refused(src, tmp_path):
    f = src / "model.safetensors"
    header, body = header_of(f)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = names[0], names[1]
    # b reads a's bytes, and the bytes b owned are read by nobody: same sizes, so only the layout is wrong
    size_b = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    size_a = header[a]["data_offsets"][1] - header[a]["data_offsets"][0]
    assert size_a >= size_b
    header[b]["data_offsets"] = [0, size_b]
    write_header(f, json.dumps(header), body)
    refused(expand(src, tmp_path / "out"), "model.safetensors", b, "overlap")


def test_duplicate_tensor_names_are_refused(src, tmp_path):
    f = src / "model.safetensors"
    header, body = header_of(f)
    name = next(k for k in header if k != "__metadata__")
    text = json.dumps(header)
    entry = json.dumps({name: header[name]})[1:-1]
    write_header(f, text[:-1] + ", " + entry + "}", body)  # the same key twice in the header
    refused(expand(src, tmp_path / "out"), "model.safetensors", name, "twice")


def test_tensor_in_two_shards_is_refused(sharded, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sharded, src)
    shards = sorted(src.glob("model-*.safetensors"))
    from safetensors import safe_open

    with safe_open(str(shards[0]), "pt") as f:
        first = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(shards[1]), "pt") as f:
        second = {k: f.get_tensor(k) for k in f.keys()}
    name = next(iter(first))
    second[name] = first[name]
    save_file(second, str(shards[1]), metadata={"format": "pt"})
    refused(expand(src, tmp_path / "out"), name, "twice")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_source_values_name_the_tensor(src, tmp_path, bad):
    from safetensors import safe_open

    f = src / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = bad
    save_file(tensors, str(f), metadata={"format": "pt"})
    refused(expand(src, tmp_path / "out"), "model.layers.1.mlp.up_proj.weight", "NaN or infinite")
    assert nothing_written(tmp_path, tmp_path / "out")


def test_custom_code_in_config_is_never_run(src, tmp_path):
    """A config.json with auto_map names code shipped beside the weights; grow must never import it."""
    marker = tmp_path / "code_ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaForCausalLM as Evil\n"
    (src / "modeling_evil.py").write_text(code)
    (src / "configuration_evil.py").write_text(code.replace("LlamaForCausalLM", "LlamaConfig"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.Evil", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (src / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "out"
    assert runner.invoke(app, ["inspect", str(src)]).exit_code == 0
    r = runner.invoke(app, ["expand", str(src), str(dst), "--factor", "2", "--verify"])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["verify", str(src), str(dst)]).exit_code == 0
    assert not marker.exists()
    grow_dir = Path(__file__).resolve().parents[1] / "grow"
    for f in grow_dir.rglob("*.py"):
        assert "trust_remote_code" not in f.read_text(), f


# ---- property: random damage to headers and index files --------------------------------------

def _mutate_header(path: Path, data) -> None:
    header, body = header_of(path)
    names = [k for k in header if k != "__metadata__"]
    name = data.draw(st.sampled_from(names))
    field = data.draw(st.sampled_from(["data_offsets", "shape", "dtype", "length", "bytes", "drop", "rename"]))
    if field == "data_offsets":
        header[name]["data_offsets"] = data.draw(st.lists(st.one_of(st.integers(-10, 10**6), st.text(max_size=3),
                                                                    st.none()), min_size=0, max_size=3))
    elif field == "shape":
        header[name]["shape"] = data.draw(st.lists(st.one_of(st.integers(-2, 300), st.floats(), st.text(max_size=2)),
                                                   max_size=4))
    elif field == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F32", "F16", "BF16", "I8", "F8_E4M3", "XX", "", "U8"]))
    elif field == "drop":
        del header[name]
    elif field == "rename":
        header[data.draw(st.sampled_from(["../x", "", "__metadata__", name + "x"]))] = header.pop(name)
    text = json.dumps(header)
    if field == "bytes":  # raw damage inside the header text
        raw = bytearray(text.encode())
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(raw)
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)
        return
    blob = text.encode()
    length = len(blob)
    if field == "length":
        length = data.draw(st.one_of(st.integers(0, length + 64), st.integers(2**26, 2**64 - 1)))
    path.write_bytes(struct.pack("<Q", length) + blob + body)


def _mutate_index(folder: Path, data) -> None:
    index = json.loads((folder / INDEX).read_text())
    names = list(index["weight_map"])
    name = data.draw(st.sampled_from(names))
    kind = data.draw(st.sampled_from(["shard", "drop", "add", "type", "raw"]))
    if kind == "shard":
        index["weight_map"][name] = data.draw(st.sampled_from(
            ["../model-00001-of-00003.safetensors", "/etc/hostname", "", ".", "..", "missing.safetensors",
             "config.json", INDEX, sorted(set(index["weight_map"].values()))[-1]]))
    elif kind == "drop":
        del index["weight_map"][name]
    elif kind == "add":
        index["weight_map"]["model.extra.weight"] = data.draw(st.sampled_from(sorted(set(index["weight_map"].values()))))
    elif kind == "type":
        index["weight_map"] = data.draw(st.sampled_from([None, [], "x", {name: 3}]))
    text = json.dumps(index)
    if kind == "raw":
        raw = bytearray(text.encode())
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        (folder / INDEX).write_bytes(bytes(raw))
    else:
        (folder / INDEX).write_text(text)


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_damage_is_refused_or_read_as_the_format_says(sharded, data):
    """Whatever the damage, grow either writes a correct output (it read exactly the tensors the
    safetensors library reads from the damaged files) or refuses with one sentence, writing nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        shutil.copytree(sharded, src)
        shards = sorted(src.glob("model-*.safetensors"))
        if data.draw(st.booleans()):
            _mutate_header(data.draw(st.sampled_from(shards)), data)
        else:
            _mutate_index(src, data)
        before = {p.name: p.read_bytes() for p in src.iterdir()}
        dst = tmp / "out"
        result = expand(src, dst)
        assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the source is only read
        if result.exit_code != 0:
            refused(result)
            assert nothing_written(tmp, dst)
            return
        assert (dst / "model.safetensors").is_file() or (dst / INDEX).is_file()
        from safetensors import safe_open

        source = Source(src)
        for shard in sorted({t.file for t in source.tensors.values()}):
            with safe_open(str(shard), "pt") as f:  # the reference reader accepts what grow accepted
                for name in f.keys():
                    if name in source.tensors:
                        assert torch.equal(f.get_tensor(name), source.get(name)), name
