"""Source: a checkpoint folder or hub id, its config, and its tensors, read lazily."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import GrowError

if TYPE_CHECKING:
    import torch

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype names -> torch dtype names and sizes; by name, so that reading a header (grow
# inspect, grow --help) does not import torch
DTYPE_LABELS = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def __getattr__(name: str):
    """DTYPES (safetensors name -> torch dtype) and DTYPE_NAMES (the reverse), built on first use."""
    if name in ("DTYPES", "DTYPE_NAMES"):
        import torch

        dtypes = {k: getattr(torch, v) for k, v in DTYPE_LABELS.items()}
        globals().update(DTYPES=dtypes, DTYPE_NAMES={v: k for k, v in dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Files beside the weights that travel with a model: tokenizer, generation and preprocessing settings.
COMPANION_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "generation_config.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)
HUB_PATTERNS = ["config.json", "*.safetensors", INDEX_NAME, "grow.json", "msg_masks.json", *COMPANION_FILES]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # byte offset of the data inside the file (for read ordering)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def tensor_nbytes(dtype: str, shape) -> int:
    """Bytes of a tensor of a safetensors dtype and shape."""
    return ITEMSIZE[dtype] * numel(shape)


MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers; so does grow, before reading one


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without reading the data: as strict as the safetensors
    library (bounded header, one entry per name, data ranges that tile the data section exactly)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise GrowError(f"{path} is truncated (shorter than a safetensors header); re-download or re-save it.")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise GrowError(f"{path} claims a header of {n:,} bytes, more than the 100 MB safetensors allows; "
                                "the file is corrupt, re-download or re-save it.")
            if n > size - 8:
                raise GrowError(f"{path} is truncated or corrupt (its header claims {n} bytes); re-download or re-save it.")
            header = json.loads(f.read(n), object_pairs_hook=lambda pairs: _unique(pairs, path))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise GrowError(f"{path} is not a valid safetensors file ({e.__class__.__name__}); re-download or re-save it.") from None
    except OSError as e:
        raise GrowError(f"cannot read {path}: {e.strerror}.") from None
    if not isinstance(header, dict):
        raise GrowError(f"{path} is not a valid safetensors file (its header is not a JSON object); re-download or re-save it.")
    header.pop("__metadata__", None)
    out = {}
    for name, meta in header.items():
        try:
            start, end = meta["data_offsets"]
            dtype, shape = meta["dtype"], tuple(meta["shape"])
            if not all(_count(v) for v in (start, end, *shape)) or end < start:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise GrowError(f"{path} has a malformed header entry for tensor {name}; re-download or re-save it.") from None
        if dtype not in DTYPE_LABELS:
            raise GrowError(f"tensor {name} in {path} has dtype {dtype}, which grow does not handle.")
        info = TensorInfo(name, path, dtype, shape, 8 + n + start)
        if end - start != info.nbytes:
            raise GrowError(f"{path} is corrupt (tensor {name} has {end - start} bytes of data for shape {list(shape)}); "
                            "re-download or re-save it.")
        out[name] = info
    _check_layout(path, out, 8 + n, size)
    return out


def _unique(pairs: list, path: Path) -> dict:
    """A JSON object whose keys are all different (json.loads would keep the last of two silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        twice = next(k for k in out if sum(1 for p in pairs if p[0] == k) > 1)
        raise GrowError(f"{path} names {twice} twice in its header; the file is corrupt, re-download or re-save it.")
    return out


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """Tensor data ranges must follow each other without overlap or gap and end at the end of the file."""
    pos, previous = data_start, None
    for t in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        if t.offset < pos:
            raise GrowError(f"tensors {previous} and {t.name} in {path} overlap (their data ranges share bytes); "
                            "the file is corrupt, re-download or re-save it.")
        if t.offset > pos:
            raise GrowError(f"{path} has {t.offset - pos} bytes before tensor {t.name} that belong to no tensor; "
                            "the file is corrupt, re-download or re-save it.")
        pos, previous = t.offset + t.nbytes, t.name
    if pos > size:
        raise GrowError(f"{path} is truncated or corrupt (tensor {previous} lies outside the file); re-download or re-save it.")
    if pos < size:
        raise GrowError(f"{path} has {size - pos} bytes after its last tensor that belong to no tensor; "
                        "the file is corrupt, re-download or re-save it.")


def resolve_path(src: str | os.PathLike) -> tuple[Path, str]:
    """A local folder, or a hub id resolved through the huggingface_hub cache (HF_HUB_OFFLINE respected)."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p.resolve(), str(p.resolve())
    if p.exists():
        raise GrowError(f"{src} is a file; give the checkpoint folder that holds config.json.")
    text = str(src)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            local = snapshot_download(text, allow_patterns=HUB_PATTERNS)
        except LocalEntryNotFoundError:
            raise GrowError(
                f"{text} is not a local folder and is not in the Hugging Face cache, and the hub cannot be reached; "
                "download it first or give a local path."
            ) from None
        except RepositoryNotFoundError:
            raise GrowError(f"{text} is not a local folder and the hub has no repository of that name.") from None
        except (HfHubHTTPError, OSError) as e:
            raise GrowError(f"could not fetch {text} from the hub: {e}.") from None
        return Path(local), text
    raise GrowError(f"{src} does not exist; give a checkpoint folder or a hub id like org/name.")


class Source:
    """A checkpoint: config.json plus safetensors weights (one file or an indexed set of shards).
    Nothing outside it is read: every file it names must lie in the folder (a hub snapshot: in its
    cache repository, where the snapshot's links point)."""

    def __init__(self, src: str | os.PathLike):
        self.path, self.id = resolve_path(src)
        self.root = (self.path if self.id == str(self.path) else self.path.parents[1]).resolve()
        self.config = self._read_config()
        self.tensors = self._read_index()
        self._handles: dict = {}
        self._lock = threading.Lock()

    def inside(self, path: Path, named_by: str | None = None) -> Path:
        """`path` if it (followed through links) lies inside the checkpoint, else one sentence."""
        if not path.resolve().is_relative_to(self.root):
            by = f"{named_by} names {path.name}, which" if named_by else f"{path}"
            raise GrowError(f"{by} points outside {self.path} (to {path.resolve()}); grow reads nothing outside "
                            "the checkpoint folder, so copy the file into it.")
        return path

    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise GrowError(f"{self.path} has no config.json; a checkpoint folder needs config.json beside its safetensors.")
        self.inside(cfg)
        try:
            data = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GrowError(f"{cfg} is not valid JSON ({e}); fix or re-download it.") from None
        if not isinstance(data, dict):
            raise GrowError(f"{cfg} must hold a JSON object.")
        return data

    def _read_index(self) -> dict[str, TensorInfo]:
        index = self.path / INDEX_NAME
        single = self.path / WEIGHTS_NAME
        if index.is_file():
            try:
                weight_map = json.loads(self.inside(index).read_text(), object_pairs_hook=lambda p: _unique(p, index))["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise GrowError(f"{index} is not a valid index (it needs a weight_map of tensor names to shard "
                                "file names); fix or re-download it.") from None
            tensors: dict[str, TensorInfo] = {}
            for fname in sorted(set(weight_map.values())):
                if Path(fname).name != fname or fname in ("", ".", ".."):
                    raise GrowError(f"{index} names shard {fname!r}, which is not a file name in the folder (it points "
                                    "outside it or nowhere); fix or re-download the index.")
                shard = self.path / fname
                if not shard.is_file():
                    raise GrowError(f"{index} names shard {fname}, which is missing from {self.path}; download the missing shard.")
                for name, info in read_safetensors_header(self.inside(shard, INDEX_NAME)).items():
                    if name in tensors:
                        raise GrowError(f"tensor {name} is stored twice, in {tensors[name].file.name} and {fname}; "
                                        "the checkpoint is corrupt, re-download or re-save it.")
                    tensors[name] = info
            missing = [n for n in weight_map if n not in tensors]
            if missing:
                raise GrowError(f"{index} lists tensor {missing[0]}, which no shard holds; the checkpoint is incomplete.")
            return tensors
        if single.is_file():
            return read_safetensors_header(self.inside(single))
        raise GrowError(f"{self.path} has no {WEIGHTS_NAME} or {INDEX_NAME}; grow reads safetensors checkpoints.")

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    @property
    def num_parameters(self) -> int:
        return sum(numel(t.shape) for t in self.tensors.values())

    @property
    def dtype(self) -> str:
        """The most common floating dtype of the weights, as safetensors names it."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.dtype] = counts.get(t.dtype, 0) + numel(t.shape)
        return max(counts, key=counts.get)

    def get(self, name: str, empty: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """The tensor, read into memory of its own (from `empty(nbytes)`, a uint8 buffer, if given). A
        plain read, not a memory map: pages mapped from the source would stay resident and memory would
        grow with the model."""
        import torch

        info = self.tensors[name]
        data = self._read(info, 0, info.nbytes, empty)
        return check_finite(info, data.view(getattr(torch, DTYPE_LABELS[info.dtype])).reshape(info.shape))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor's first axis, reading only their bytes."""
        import torch

        info = self.tensors[name]
        row = info.nbytes // max(info.shape[0], 1)
        data = self._read(info, start * row, (stop - start) * row)
        return data.view(getattr(torch, DTYPE_LABELS[info.dtype])).reshape(stop - start, *info.shape[1:])

    def _read(self, info: TensorInfo, at: int, nbytes: int, empty=None) -> torch.Tensor:
        import torch

        with self._lock:  # the reading thread and the builder (a tensor no recipe lists) both read
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = open(info.file, "rb", buffering=0)
        data = empty(nbytes) if empty else torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(data.numpy())
        done = 0
        while done < nbytes:
            n = os.preadv(handle.fileno(), [view[done:]], info.offset + at + done)
            if n == 0:
                raise GrowError(f"{info.file} ended inside tensor {info.name}; the file is truncated, re-download it.")
            done += n
        return data

    def hashed_files(self) -> list[Path]:
        """The files whose sha256 grow.json records: the config, the index and every weights file."""
        paths = [self.path / "config.json", *self.files]
        if (self.path / INDEX_NAME).is_file():
            paths.insert(1, self.path / INDEX_NAME)
        return paths

    def companion_files(self) -> list[Path]:
        return [self.inside(self.path / n) for n in COMPANION_FILES if (self.path / n).is_file()]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def check_finite(info: TensorInfo, t: torch.Tensor) -> torch.Tensor:
    """`t` if every value is finite, else one sentence naming the tensor. Its smallest and largest
    values tell (NaN propagates into both), without a mask as large as the tensor."""
    if t.is_floating_point() and t.numel():
        import torch

        low, high = torch.aminmax(t)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise GrowError(f"tensor {info.name} in {info.file.name} holds NaN or infinite values; the checkpoint is "
                            "damaged (or was saved after training diverged), so grow will not build on it.")
    return t


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class StreamHasher:
    """sha256 of files fed by reads made anyway. Bytes that arrive in file order are hashed as they
    pass; a small gap before them (the header, a small tensor read later or never) is read and hashed
    then; a read far ahead is let go (the hash catches up with it when the reads that come before it
    arrive, or at the end), so reading out of file order never stalls the reads; a range already
    passed is ignored; whatever was never reached is read at the end (finish). Before the reads begin,
    hash_ahead() reads and hashes the files in order on a thread of its own, while the process has
    nothing else for the disk and the second core to do (importing torch takes seconds)."""

    CHUNK = 1 << 24
    GAP = 1 << 26  # larger gaps are not read while streaming

    def __init__(self, paths: list[Path], progress=None):
        self.state = {Path(p): [hashlib.sha256(), 0] for p in paths}
        self.total = sum(Path(p).stat().st_size for p in paths)
        self.done = 0
        self.progress = progress
        self._ahead: threading.Thread | None = None
        self._stop = threading.Event()
        if progress:
            progress("hashing", 0, self.total)

    def hash_ahead(self) -> None:
        """Start hashing the files front to back until take_over()."""
        self._ahead = threading.Thread(target=self._run_ahead, daemon=True, name="grow-hash-ahead")
        self._ahead.start()

    def _run_ahead(self) -> None:
        try:
            for path in self.state:
                if self._stop.is_set():
                    return
                self._catch_up(path, None, self._stop)
        except OSError:
            return  # a file that cannot be read is reported by the reads made anyway

    def take_over(self, progress=None) -> None:
        """Stop hashing ahead (the reads made anyway feed the hash from here on), reporting to progress."""
        self._stop.set()
        if self._ahead is not None:
            self._ahead.join()
            self._ahead = None
        self.progress = progress
        if progress:
            progress("hashing", self.done, self.total)

    def feed(self, path: Path, offset: int, data) -> None:
        """Bytes `data` read from `path` at `offset`."""
        state = self.state.get(path)
        if state is None:
            return
        data = memoryview(data).cast("B")
        if state[1] < offset <= state[1] + self.GAP:
            self._catch_up(path, offset)
        pos = state[1]
        if offset <= pos < offset + len(data):
            self._update(state, data[pos - offset:])

    def _update(self, state, data) -> None:
        state[0].update(data)
        state[1] += len(data)
        self.done += len(data)
        if self.progress:
            self.progress("hashing", self.done, self.total)

    def _catch_up(self, path: Path, until: int | None, stop: threading.Event | None = None) -> None:
        state = self.state[path]
        buffer = memoryview(bytearray(self.CHUNK))
        with open(path, "rb", buffering=0) as f:
            f.seek(state[1])
            while (until is None or state[1] < until) and not (stop and stop.is_set()):
                n = f.readinto(buffer if until is None else buffer[:min(self.CHUNK, until - state[1])])
                if not n:
                    break
                self._update(state, buffer[:n])

    def finish(self) -> dict[Path, str]:
        self.take_over(self.progress)
        for path in self.state:
            self._catch_up(path, None)
        return {path: h.hexdigest() for path, (h, _) in self.state.items()}
