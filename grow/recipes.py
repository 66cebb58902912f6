"""Recipe files for batch jobs: a YAML/JSON list of grow calls, or a grow.json to re-make an output."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path

import yaml

from .errors import GrowError, UsageError

COMMANDS = ("expand", "shrink", "upcycle", "verify")
NOT_OPTIONS = ("view", "importance", "progress", "options")  # parameters no recipe gives


def options_of(command: str) -> set[str]:
    """Every key a job of this command may hold: the API function's keywords and every method's options."""
    from . import api, ops

    methods = ops.METHODS.get(command, {})
    keys = set(inspect.signature(getattr(api, command)).parameters)
    for build in methods.values():
        keys |= set(inspect.signature(build).parameters)
    return (keys - set(NOT_OPTIONS)) | {"command"}


def check_keys(mapping: dict, valid: set[str], where: str) -> None:
    """Refuse a key no command reads (a typo would otherwise fall back to a default silently)."""
    for key in mapping:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(repr(k) for k in sorted(valid))}."
            raise UsageError(f"{where} has an unknown key '{key}'{hint}")


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
    if isinstance(data, dict):
        check_keys(data, {"jobs", "defaults"}, f"recipe {path}")
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise UsageError(f"recipe {path} needs a non-empty 'jobs' list (see configs/ for examples).")
    defaults = _keys(data.get("defaults") or {}, f"recipe {path} defaults")
    check_keys(defaults, set().union(*(options_of(c) for c in COMMANDS)) - {"command", "src", "dst"},
               f"the defaults of {path}")
    jobs = []
    for k, job in enumerate(data["jobs"], 1):
        where = f"job {k} of {path}"
        if not isinstance(job, dict) or job.get("command") not in COMMANDS:
            raise UsageError(f"{where} needs 'command', one of {', '.join(COMMANDS)}.")
        args = _keys(job, where)
        check_keys(args, options_of(args["command"]), where)
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
