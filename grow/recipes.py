"""Recipe files for batch jobs: a YAML/JSON list of grow calls, or a grow.json to re-make an output."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import GrowError, UsageError

COMMANDS = ("expand", "shrink", "upcycle", "verify")


def load_jobs(path, dst=None) -> list[tuple[str, dict]]:
    """Jobs as (command, keyword arguments for the API function of that name)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except OSError as e:
        raise GrowError(f"cannot read recipe {path}: {e.strerror}.") from None
    except yaml.YAMLError as e:
        raise UsageError(f"recipe {path} is not valid YAML or JSON: {str(e).splitlines()[0]}.") from None
    if isinstance(data, dict) and "operation" in data and "source" in data:
        return [_remake(path, data, dst)]
    if dst is not None:
        raise UsageError("--dst only applies to re-making an output from its grow.json.")
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise UsageError(f"recipe {path} needs a non-empty 'jobs' list (see configs/ for examples).")
    defaults = _keys(data.get("defaults") or {}, f"recipe {path} defaults")
    jobs = []
    for k, job in enumerate(data["jobs"], 1):
        where = f"job {k} of {path}"
        if not isinstance(job, dict) or job.get("command") not in COMMANDS:
            raise UsageError(f"{where} needs 'command', one of {', '.join(COMMANDS)}.")
        args = _keys(job, where)
        command = args.pop("command")
        for key in ("src", "dst"):
            if key not in args:
                raise UsageError(f"{where} needs '{key}'.")
        merged = {} if command == "verify" else dict(defaults)
        merged.update(args)
        jobs.append((command, merged))
    return jobs


def _keys(mapping: dict, where: str) -> dict:
    if not isinstance(mapping, dict):
        raise UsageError(f"{where} must be a mapping of option names to values.")
    return {str(k).replace("-", "_"): v for k, v in mapping.items()}


def _remake(path: Path, record: dict, dst) -> tuple[str, dict]:
    """The call that made an output, from the grow.json written into it."""
    if dst is None:
        raise UsageError(f"re-making the output recorded in {path} needs --dst, a new target folder.")
    if record["operation"] not in COMMANDS:
        raise UsageError(f"{path} records operation {record['operation']!r}, which grow cannot run.")
    options = {k: v for k, v in (record.get("options") or {}).items() if v is not None}
    return record["operation"], {"src": record["source"]["id"], "dst": str(dst), "method": record["method"], **options}


def describe(command: str, args: dict) -> str:
    return f"{command} {args.get('src')} -> {args.get('dst')}"


__all__ = ["COMMANDS", "describe", "load_jobs"]
