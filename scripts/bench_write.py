"""Benchmark: how grow's output writer puts bytes on disk, against `cp` of the same bytes, in the same run.

  cp          `cp` of a file of N bytes, then `sync` (the disk floor)
  buffered    grow.writer.StreamFile without O_DIRECT: write() in 16 MB calls through the page cache, then `sync`
  O_DIRECT    grow.writer.StreamFile with O_DIRECT, the data copied through its aligned staging buffers,
              then `sync`
  placed      the same with data placed as grow places its output tensors (as far past a page boundary
              as its offset in the file): written from where it lies, no copy, then `sync`

The three alternate, --runs times each, each in a child process of its own, and the medians are
compared. The bytes written come from one 16 MB buffer, and the grow children time themselves from
opening the file to the end of `sync` (their Python start-up is not the writer's cost), so only
getting the bytes to disk is timed.

    python scripts/bench_write.py [--gb 5.4] [--runs 3] [--workdir .cache/bench-write]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

WRITE_CHUNK_BYTES = 16 << 20
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's grow, in the children too


def write_file(path: Path, nbytes: int, mode: str) -> tuple[float, float]:
    """Write and sync; wall and CPU (user + system) seconds of doing so."""
    import mmap

    import numpy as np

    from grow.writer import WRITE_CHUNK, StreamFile

    direct = mode != "buffered"
    # one page in: a page-aligned chunk is placed like its file offsets (multiples of its size)
    memory = np.frombuffer(mmap.mmap(-1, WRITE_CHUNK + 4096), np.uint8)
    chunk = memory[:WRITE_CHUNK] if mode == "placed" else memory[1:WRITE_CHUNK + 1]
    chunk[:] = np.random.default_rng(0).integers(0, 256, WRITE_CHUNK, dtype=np.uint8)
    start, cpu = time.perf_counter(), _cpu()
    f = StreamFile(path, direct)
    for at in range(0, nbytes, WRITE_CHUNK):
        f.write(chunk[: min(WRITE_CHUNK, nbytes - at)])
    f.close()
    if direct and not f.direct:
        sys.exit(f"{path.parent} has no O_DIRECT; choose a --workdir on another filesystem.")
    os.sync()
    return time.perf_counter() - start, _cpu() - cpu


def _cpu(who=resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def timed_cp(args: list[str]) -> tuple[float, float]:
    """Wall seconds (including `sync`) and user + system CPU seconds of cp."""
    start, cpu = time.perf_counter(), _cpu(resource.RUSAGE_CHILDREN)
    subprocess.run(args, check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start, _cpu(resource.RUSAGE_CHILDREN) - cpu


def timed_grow(args: list[str]) -> tuple[float, float]:
    """What the child measured itself (see write_file)."""
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=5.4, help="bytes to write, in GB (make bench's output is 5.4 GB)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(".cache/bench-write"))
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(*write_file(Path(args.child[0]), int(args.child[1]), args.child[2]))
        return
    nbytes = int(args.gb * 1e9)
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if shutil.disk_usage(work).free < 2.2 * nbytes:
        sys.exit(f"{work} needs {2.2 * nbytes / 1e9:.1f} GB free; pass a smaller --gb or another --workdir.")
    source = work / "source.bin"
    write_file(source, nbytes, "placed")
    with open(source, "rb") as f:  # into the page cache: cp then only writes, as the others do
        while f.read(WRITE_CHUNK_BYTES):
            pass
    out = work / "out.bin"
    commands = {
        "cp": ["cp", str(source), str(out)],
        "buffered": [sys.executable, __file__, "--child", str(out), str(nbytes), "buffered"],
        "O_DIRECT": [sys.executable, __file__, "--child", str(out), str(nbytes), "direct"],
        "placed": [sys.executable, __file__, "--child", str(out), str(nbytes), "placed"],
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
    try:
        for _ in range(args.runs):
            for name, cmd in commands.items():
                out.unlink(missing_ok=True)
                subprocess.run(["sync"], check=True)
                results[name].append((timed_cp if name == "cp" else timed_grow)(cmd))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{nbytes / 1e9:.2f} GB per run; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'approach':<10} {'wall seconds of each run':<26} {'median':>7} {'vs cp':>6} {'CPU s':>6}")
    base = statistics.median(w for w, _ in results["cp"])
    for name, runs in results.items():
        walls = [w for w, _ in runs]
        med = statistics.median(walls)
        cpu = sorted(runs)[len(runs) // 2][1]
        print(f"{name:<10} {' '.join(f'{w:.1f}' for w in walls):<26} {med:7.2f} {med / base:5.2f}x {cpu:6.1f}")


if __name__ == "__main__":
    main()
