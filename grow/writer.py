"""Output: sharded safetensors written as a stream, inside a folder that appears atomically."""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import queue
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .checkpoint import INDEX_NAME, WEIGHTS_NAME, tensor_nbytes
from .errors import GrowError, UsageError

if TYPE_CHECKING:
    import torch


def parse_size(text: str | int) -> int:
    """'5GB' -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    try:
        value = float(num) * units[s[len(num):]]
    except (ValueError, KeyError):
        raise UsageError(f"--shard-size {text!r} is not a size; write it like 5GB or 500MB.") from None
    if value < 1:
        raise UsageError(f"--shard-size must be positive, not {text!r}.")
    return int(value)


# bytes per write(): the kernel's cost per call is small next to 16 MB, and the staging buffer stays in cache
WRITE_CHUNK = 16 << 20
BLOCK = 4096  # O_DIRECT wants buffer address, length and file offset aligned to the device's logical block


class StreamFile:
    """A file written front to back. Where the filesystem allows it, the bytes go to the disk with
    O_DIRECT through two aligned staging buffers, one filled while a thread of the file's own writes the
    other: buffered write() of a 5.4 GB output cost the kernel 18 s of CPU here (page-cache allocation,
    reclaim and dirty throttling) where O_DIRECT leaves the disk the only limit, and nothing for `sync` to
    do (scripts/bench_write.py). Data whose address is as far past a block boundary as its place in the
    file (grow's output buffers are placed so) is written where it lies, all but its first and last
    partial blocks, without the copy into staging. The tail is padded to a block and cut back with
    ftruncate. Filesystems without O_DIRECT get plain buffered writes."""

    def __init__(self, path: Path, direct: bool = True):
        self.size = 0
        self._fd = -1
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                    raise
        self.direct = self._fd >= 0
        if not self.direct:
            self._fd = os.open(path, flags, 0o644)
            return
        self._stages = [np.frombuffer(mmap.mmap(-1, WRITE_CHUNK), np.uint8) for _ in range(2)]  # page-aligned
        self._fill = 0
        self._io = ThreadPoolExecutor(1, thread_name_prefix="grow-write")
        self._pending: Future | None = None  # the write of the other staging buffer

    def write(self, data) -> None:
        data = np.frombuffer(data, np.uint8)
        offset = self.size
        self.size += len(data)
        if not self.direct:
            for at in range(0, len(data), WRITE_CHUNK):
                _write_all(self._fd, data[at:at + WRITE_CHUNK])
            return
        head = -offset % BLOCK  # bytes up to the file's next block boundary
        whole = (len(data) - head) // BLOCK * BLOCK if len(data) > head else 0
        if whole >= WRITE_CHUNK and (data.ctypes.data + head) % BLOCK == 0:
            self._stage(data[:head])  # staging now ends on a block boundary
            if self._fill:
                self._flush(self._fill)
            self._wait()
            _write_all(self._fd, data[head:head + whole])  # from where the data lies
            data = data[head + whole:]
        self._stage(data)

    def _stage(self, data: np.ndarray) -> None:
        """Copy into the staging buffers, handing each full one to the writing thread."""
        at = 0
        while at < len(data):
            n = min(len(data) - at, WRITE_CHUNK - self._fill)
            np.copyto(self._stages[0][self._fill:self._fill + n], data[at:at + n])  # memcpy without the GIL
            self._fill += n
            at += n
            if self._fill == WRITE_CHUNK:
                self._flush(WRITE_CHUNK)

    def _flush(self, nbytes: int) -> None:
        """Hand the filled buffer's first nbytes to the writing thread once the other buffer is written."""
        self._wait()
        self._pending = self._io.submit(_write_all, self._fd, self._stages[0][:nbytes])
        self._stages.reverse()
        self._fill = 0

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if self.direct:
                try:
                    if self._fill:
                        padded = -(-self._fill // BLOCK) * BLOCK
                        self._stages[0][self._fill:padded] = 0
                        self._flush(padded)
                    self._wait()
                    os.ftruncate(self._fd, self.size)
                finally:  # the fd stays open until no write of it can still run
                    self._io.shutdown(wait=True)
        finally:
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, data: np.ndarray) -> None:
    """Write every byte. A filesystem that opens files O_DIRECT but refuses the writes (EINVAL: it wants
    another alignment) gets the rest of the file through the page cache."""
    view = memoryview(data)
    while len(view):
        try:
            view = view[os.write(fd, view):]
        except OSError as e:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if e.errno != errno.EINVAL or not flags & os.O_DIRECT:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)


class ShardedWriter:
    """Writes tensors in a fixed order straight to disk: headers are known up front from the plan,
    so nothing is buffered beyond the tensor being written."""

    def __init__(self, folder: Path, layout: list[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int | None):
        self.folder = folder
        self.shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        size = 0
        for item in layout:
            nbytes = tensor_nbytes(item[1], item[2])
            if max_shard_bytes and self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(item)
            size += nbytes
        n = len(self.shards)
        self.names = [WEIGHTS_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.total_size = sum(tensor_nbytes(d, s) for _, d, s in layout)
        self._shard = -1
        self._pos = 0
        self._file = None
        self._headers = []
        self.file_offsets: list[int] = []  # where each tensor's bytes start in its file, in layout order
        for shard in self.shards:
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, dtype, shape in shard:
                nbytes = tensor_nbytes(dtype, shape)
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            self._headers.append(len(blob).to_bytes(8, "little") + blob)
            self.file_offsets += [len(self._headers[-1]) + h["data_offsets"][0] for h in list(header.values())[1:]]

    def _open_next(self) -> None:
        if self._file:
            self._file.close()
        self._shard += 1
        self._pos = 0
        self._file = StreamFile(self.folder / self.names[self._shard])
        self._file.write(self._headers[self._shard])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch  # (the tensor's module: the writer alone does not load it, so parse_size stays light)

        from .checkpoint import DTYPE_NAMES

        if self._file is None or self._pos == len(self.shards[self._shard]):
            self._open_next()
        want_name, want_dtype, want_shape = self.shards[self._shard][self._pos]
        got_dtype = DTYPE_NAMES[tensor.dtype]
        if (name, got_dtype, tuple(tensor.shape)) != (want_name, want_dtype, tuple(want_shape)):
            raise RuntimeError(f"writer expected {want_name} {want_dtype}{list(want_shape)}, got {name} {got_dtype}{list(tensor.shape)}")
        self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        self._pos += 1

    def discard(self) -> None:
        """Close the file being written without finishing it (the run failed; its folder is removed)."""
        if self._file:
            self._file.close()
            self._file = None

    def close(self) -> list[str]:
        self.discard()
        written = sum(len(s) for s in self.shards[: self._shard]) + self._pos
        if written != sum(len(s) for s in self.shards):
            raise RuntimeError("writer closed before every tensor was written")
        if len(self.names) > 1:
            weight_map = {name: self.names[k] for k, shard in enumerate(self.shards) for name, _, _ in shard}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return self.names


class BackgroundWriter:
    """Writes on a thread so the disk works while the next tensors are built. At most depth + 1 tensors
    are alive: `depth` written or waiting to be, and the one being built (submit waits for a slot)."""

    def __init__(self, writer: ShardedWriter, on_written=None, depth: int = 1):
        self.writer = writer
        self.on_written = on_written
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.BoundedSemaphore(depth)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if self.error is None:
                    self.writer.write(*item)
                    if self.on_written:
                        self.on_written(item[1])
            except BaseException as e:  # handed to the main thread at the next submit or close
                self.error = e
            finally:
                del item  # freed before its slot is given back
                self._slots.release()

    def submit(self, name: str, tensor: torch.Tensor) -> None:
        self._slots.acquire()
        self._raise()
        self._queue.put((name, tensor))

    def close(self) -> list[str]:
        self.stop()
        self._raise()
        return self.writer.close()

    def stop(self) -> None:
        """Finish the write in progress and end the thread; safe to call twice."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.writer.discard()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def check_target(src: Path, dst: Path, force: bool) -> None:
    src, dst = src.resolve(), dst.resolve()
    if dst == src or src in dst.parents:
        raise UsageError(f"the target {dst} lies inside the source {src}; choose a folder outside it.")
    if dst in src.parents:
        raise UsageError(f"the target {dst} contains the source {src}; choose another folder.")
    if dst.exists() and not force:
        raise GrowError(f"{dst} already exists; choose another target or pass --force to replace it.")
    if dst.exists() and not dst.is_dir():
        raise GrowError(f"{dst} exists and is not a folder; remove it or choose another target.")
    parent = next(p for p in dst.parents if p.exists())  # the folder DST will be made in
    if not parent.is_dir():
        raise GrowError(f"{dst} cannot be created: {parent} is a file, not a folder; choose another target.")


@contextmanager
def atomic_folder(dst: Path, force: bool):
    """Yield a temporary folder beside dst; on success it replaces dst, on any failure it is removed."""
    dst = dst.resolve()
    tmp = dst.parent / f".{dst.name}.grow-tmp-{os.getpid()}"
    try:  # one try from mkdir on: an interrupt right after it still removes tmp
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            raise GrowError(f"cannot create {dst}: {e.strerror or e}; choose a folder you can write to.") from None
        yield tmp
        if dst.exists():
            if not force:
                raise GrowError(f"{dst} appeared while grow was writing; nothing was replaced.")
            old = dst.parent / f".{dst.name}.grow-old-{os.getpid()}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == 28:
            raise GrowError(f"the disk under {dst.parent} is full; free space and run again (nothing was written).") from None
        raise GrowError(f"writing {dst} failed: {e.strerror or e}; nothing was written.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
