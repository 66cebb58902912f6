"""The executor hashes the source while it reads it: grow.json's hashes are the files' sha256 whatever
order the plan reads tensors in (in file order, again and again, or only some of them)."""

import hashlib
import json
import os

import pytest

import grow


def _sha256(folder, names):
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


@pytest.mark.parametrize("operation,options", [
    ("expand", dict(factor=2)),  # every tensor once, in file order
    ("expand", dict(method="stack", layers=5)),  # layers read again
    ("shrink", dict(layers=1)),  # a layer never read
])
def test_streamed_hashes_are_the_files_sha256(model_dir, tmp_path, operation, options):
    src, dst = model_dir("llama"), tmp_path / "out"
    getattr(grow, operation)(src, dst, **options)
    hashed = json.loads((dst / "grow.json").read_text())["source"]["files"]
    assert hashed == _sha256(src, ["config.json", "model.safetensors"])


def test_streamed_hashes_of_a_sharded_source(model_dir, tmp_path):
    sharded, dst = tmp_path / "sharded", tmp_path / "out"
    grow.expand(model_dir("qwen3", True), sharded, factor=2, shard_size="150KB")
    grow.expand(sharded, dst, method="stack", layers=3)
    hashed = json.loads((dst / "grow.json").read_text())["source"]["files"]
    shards = set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1
    assert hashed == _sha256(sharded, ["config.json", "model.safetensors.index.json", *shards])


def test_progress_has_a_hashing_stage(model_dir, tmp_path):
    seen = {}
    grow.expand(model_dir("llama"), tmp_path / "out", factor=2, progress=lambda s, d, t: seen.setdefault(s, []).append((d, t)))
    done, total = seen["hashing"][-1]
    assert done == total == sum((model_dir("llama") / n).stat().st_size for n in ("config.json", "model.safetensors"))
    assert seen["writing"][-1][0] == seen["writing"][-1][1]


@pytest.mark.no_transformers
def test_hashing_never_reads_far_ahead(tmp_path, monkeypatch):
    """A read far ahead of the hash is let go and caught up later, not read through at once."""
    from grow.checkpoint import StreamHasher

    data = bytes(range(256)) * 4096  # 1 MiB
    path = tmp_path / "f"
    path.write_bytes(data)
    monkeypatch.setattr(StreamHasher, "GAP", 1024)
    h = StreamHasher([path])
    h.feed(path, 900_000, data[900_000:])  # far ahead: nothing read
    assert h.done == 0
    h.feed(path, 100, data[100:500_000])  # a small gap (the "header") is read, then hashed in order
    assert h.done == 500_000
    assert h.finish()[path] == hashlib.sha256(data).hexdigest()


@pytest.mark.no_transformers
def test_hashing_ahead_then_taking_over_gives_every_files_sha256(tmp_path, monkeypatch):
    """Files hashed front to back on a thread of their own (while torch imports), stopped wherever it
    got to; then the reads made anyway, in file order and not, and the end: every sha256 is exact."""
    import threading

    from grow.checkpoint import StreamHasher

    monkeypatch.setattr(StreamHasher, "CHUNK", 4096)
    files = {tmp_path / f"f{k}": bytes(range(256)) * (1000 * (k + 1) + 3) for k in range(3)}
    for path, data in files.items():
        path.write_bytes(data)
    h = StreamHasher(list(files))
    passed, update = threading.Event(), h._update

    def update_then_wait(state, data):  # past 300 kB, the thread waits for the take-over
        update(state, data)
        if h.done > 300_000:
            passed.set()
            h._stop.wait(10)

    monkeypatch.setattr(h, "_update", update_then_wait)
    h.hash_ahead()
    assert passed.wait(10)
    h.take_over()
    done = h.done
    assert 300_000 < done < sum(map(len, files.values()))  # it stopped part of the way
    for path, data in files.items():
        for at in (len(data) // 2, 0, len(data) // 3):
            h.feed(path, at, data[at:])
    assert h.finish() == {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}


def test_outputs_go_to_disk_from_where_they_were_built(model_dir, tmp_path, monkeypatch):
    """The executor places each output where O_DIRECT can write it from (as far past a block boundary
    as its offset in the file). With staging buffers smaller than the tensors, most bytes go to disk
    from the tensors' own memory, and the file is byte for byte the one written through staging."""
    from grow import writer

    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except (OSError, AttributeError):
        pytest.skip("this filesystem has no O_DIRECT")
    src = model_dir("llama")
    options = dict(method="hypercloning", factor=2, shard_size="400KB")  # offsets in several files
    grow.expand(src, tmp_path / "staged", **options)  # tensors under 16 MB: staged
    writes, write_all = [], writer._write_all
    monkeypatch.setattr(writer, "_write_all", lambda fd, data: writes.append(len(data)) or write_all(fd, data))
    monkeypatch.setattr(writer, "WRITE_CHUNK", 4 * writer.BLOCK)
    grow.expand(src, tmp_path / "direct", **options)
    own = sum(n for n in writes if n > writer.WRITE_CHUNK)  # staged writes are at most one buffer
    assert own > 0.8 * sum(writes)
    shards = sorted(p.name for p in (tmp_path / "staged").glob("*.safetensors"))
    assert len(shards) > 1
    for name in shards:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "staged" / name).read_bytes()
