"""Start-up time of the grow command: `grow --help` and `grow inspect` beside the bare interpreter.

    python scripts/startup_time.py [SRC]    # SRC: a checkpoint folder for grow inspect (default .cache/demo/llama-small)

Prints the median wall time of several runs of each, alternating, with the CPU time (user + system: less
sensitive than wall time to other jobs on the machine), and which of the slow-to-import libraries (torch,
transformers, pydantic) each command imported. Every command runs once untimed first, with its bytecode
cached in a temporary folder (PYTHONPYCACHEPREFIX), as an installed grow has it: under
PYTHONDONTWRITEBYTECODE every run would compile grow's sources again."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 7
HEAVY = ("torch", "transformers", "pydantic")
# runs the command as the `grow` entry point does, then names the heavy libraries it imported
CHECK = ("import sys; from grow.cli import main\ntry: main()\nexcept SystemExit: pass\n"
         f"print('\\nimported:', *(m for m in {HEAVY!r} if m in sys.modules))")


def timed(args: list[str], env: dict) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system) and stdout of one run."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, out


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/demo/llama-small")
    commands = {
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
        "grow --help": [sys.executable, "-m", "grow", "--help"],
    }
    if (src / "config.json").is_file():
        commands[f"grow inspect {src}"] = [sys.executable, "-m", "grow", "inspect", str(src), "--json"]
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"PYTHONPYCACHEPREFIX": cache}
        for args in commands.values():
            timed(args, env)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
        for _ in range(RUNS):
            for name, args in commands.items():
                times[name].append(timed(args, env)[:2])
        imported = {name: timed([sys.executable, "-c", CHECK, *args[3:]], env)[2].rsplit("\nimported:", 1)[1].split()
                    for name, args in commands.items() if name.startswith("grow")}
    print(f"{len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f}; {RUNS} runs each, alternating")
    for name, ts in times.items():
        wall, cpu = [t[0] for t in ts], [t[1] for t in ts]
        print(f"{name:<40} median {statistics.median(wall):.3f} s (min {min(wall):.3f}), "
              f"CPU {statistics.median(cpu):.3f} s")
    for name, modules in imported.items():
        print(f"{name} imported: {', '.join(modules) or 'none of ' + ', '.join(HEAVY)}")

if __name__ == "__main__":
    main()
