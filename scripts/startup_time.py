"""Start-up time of the grow command: `grow --help` and `grow inspect` beside the bare interpreter.

    python scripts/startup_time.py [SRC]    # SRC: a checkpoint folder for grow inspect (default .cache/demo/llama-small)

Prints the median wall time of several runs of each, alternating, and which of the slow-to-import libraries
(torch, transformers, pydantic) each command imported."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = 7
HEAVY = ("torch", "transformers", "pydantic")
# runs the command as the `grow` entry point does, then names the heavy libraries it imported
CHECK = ("import sys; from grow.cli import main\ntry: main()\nexcept SystemExit: pass\n"
         f"print('\\nimported:', *(m for m in {HEAVY!r} if m in sys.modules))")


def timed(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - start, out


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/demo/llama-small")
    commands = {
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
        "grow --help": [sys.executable, "-m", "grow", "--help"],
    }
    if (src / "config.json").is_file():
        commands[f"grow inspect {src}"] = [sys.executable, "-m", "grow", "inspect", str(src), "--json"]
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(RUNS):
        for name, args in commands.items():
            times[name].append(timed(args)[0])
    for name, ts in times.items():
        print(f"{name:<45} median {statistics.median(ts):.3f} s  (min {min(ts):.3f}, {RUNS} runs)")
    for name, args in commands.items():
        if name.startswith("grow"):
            out = timed([sys.executable, "-c", CHECK, *args[3:]])[1]
            imported = out.rsplit("\nimported:", 1)[1].split()
            print(f"{name} imported: {', '.join(imported) or 'none of ' + ', '.join(HEAVY)}")


if __name__ == "__main__":
    main()
