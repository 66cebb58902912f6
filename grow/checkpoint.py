"""Source: a checkpoint folder or hub id, its config, and its tensors, read lazily."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without reading the data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise GrowError(f"{path} is truncated (shorter than a safetensors header); re-download or re-save it.")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise GrowError(f"{path} is truncated or corrupt (its header claims {n} bytes); re-download or re-save it.")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise GrowError(f"{path} is not a valid safetensors file ({e.__class__.__name__}); re-download or re-save it.") from None
    except OSError as e:
        raise GrowError(f"cannot read {path}: {e.strerror}.") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    out = {}
    for name, meta in header.items():
        try:
            start, end = meta["data_offsets"]
            dtype, shape = meta["dtype"], tuple(int(s) for s in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise GrowError(f"{path} has a malformed header entry for tensor {name}; re-download or re-save it.") from None
        if dtype not in DTYPE_LABELS:
            raise GrowError(f"tensor {name} in {path} has dtype {dtype}, which grow does not handle.")
        info = TensorInfo(name, path, dtype, shape, 8 + n + start)
        if end > data_size or end - start != info.nbytes:
            raise GrowError(f"{path} is truncated or corrupt (tensor {name} lies outside the file); re-download or re-save it.")
        out[name] = info
    return out


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
    """A checkpoint: config.json plus safetensors weights (one file or an indexed set of shards)."""

    def __init__(self, src: str | os.PathLike):
        self.path, self.id = resolve_path(src)
        self.config = self._read_config()
        self.tensors = self._read_index()
        self._handles: dict = {}

    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise GrowError(f"{self.path} has no config.json; a checkpoint folder needs config.json beside its safetensors.")
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
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise GrowError(f"{index} is not a valid index (it needs a weight_map); fix or re-download it.") from None
            files = sorted(set(weight_map.values()))
            tensors: dict[str, TensorInfo] = {}
            for fname in files:
                shard = self.path / fname
                if not shard.is_file():
                    raise GrowError(f"{index} names shard {fname}, which is missing from {self.path}; download the missing shard.")
                tensors.update(read_safetensors_header(shard))
            missing = [n for n in weight_map if n not in tensors]
            if missing:
                raise GrowError(f"{index} lists tensor {missing[0]}, which no shard holds; the checkpoint is incomplete.")
            return tensors
        if single.is_file():
            return read_safetensors_header(single)
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

    def get(self, name: str) -> torch.Tensor:
        """The tensor, read into memory of its own. A plain read, not a memory map: pages mapped from
        the source would stay resident and memory would grow with the model."""
        import torch

        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open(info.file, "rb", buffering=0)
        data = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(data.numpy())
        done = 0
        while done < info.nbytes:
            n = os.preadv(handle.fileno(), [view[done:]], info.offset + done)
            if n == 0:
                raise GrowError(f"{info.file} ended inside tensor {name}; the file is truncated, re-download it.")
            done += n
        return data.view(getattr(torch, DTYPE_LABELS[info.dtype])).reshape(info.shape)

    def companion_files(self) -> list[Path]:
        return [self.path / n for n in COMPANION_FILES if (self.path / n).is_file()]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


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
