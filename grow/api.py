"""The Python interface; the CLI is a thin layer over these functions."""

from __future__ import annotations

import inspect as _inspect
import resource
from pathlib import Path
from typing import Callable

from . import ops
from .arch.view import ModelView
from .checkpoint import DTYPES, Source
from .errors import UsageError
from .plan import Plan, execute
from .verify import DEFAULT_TOL
from .verify import verify as _verify
from .writer import parse_size


def inspect(src) -> dict:
    """Architecture, every size an operator changes (under the config's own key names), parameters, dtype, tie."""
    view = ModelView(Source(src))
    out = {"architecture": view.architecture, "family": view.spec.family}
    for name, sk in view.spec.sizes.items():
        key = sk.key.rsplit(".", 1)[-1] if sk.key and not sk.ratio_of else name
        out[key] = view.sizes[name]
    out["parameters"] = view.source.num_parameters
    out["dtype"] = str(DTYPES[view.source.dtype]).removeprefix("torch.")
    out[view.spec.tie_key or "tie_word_embeddings"] = view.tied
    return out


def _build(builder: Callable[..., Plan], view: ModelView, method: str, options: dict) -> Plan:
    accepted = _inspect.signature(builder).parameters
    for key, value in options.items():
        if value is not None and key not in accepted:
            raise UsageError(f"--{key.replace('_', '-')} does not apply to --method {method}.")
    return builder(view, **{k: v for k, v in options.items() if v is not None})


def _operate(operation: str, methods: dict, src, dst, method: str, *, dry_run: bool, verify: bool, force: bool,
             shard_size, tol: float, progress, options: dict) -> dict:
    if method not in methods:
        raise UsageError(f"--method {method} is not a way to {operation}; choose one of {', '.join(methods)}.")
    if dst is None and not dry_run:
        raise UsageError(f"{operation} needs a target folder (or --dry-run).")
    shard_bytes = parse_size(shard_size)
    source = Source(src)
    plan = _build(methods[method], ModelView(source), method, options)
    result = {"source": source.id, "source_parameters": source.num_parameters, "plan": plan.summary()}
    if dry_run:
        return result
    stats = execute(plan, source, Path(dst), shard_size=shard_bytes, force=force, progress=progress)
    result.update(
        target=str(Path(dst).resolve()),
        target_parameters=plan.num_parameters,
        seconds=stats["seconds"],
        bytes_written=stats["bytes"],
        files=stats["files"],
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    del result["plan"]["tensors"]
    if verify:
        result["verification"] = _verify(source.path, dst, tol=tol)
    return result


def expand(src, dst=None, *, method: str = "hypercloning", dry_run: bool = False, verify: bool = False,
           force: bool = False, shard_size="5GB", tol: float = DEFAULT_TOL, progress=None, **options) -> dict:
    """Write a larger model that starts from what `src` knows. Options depend on the method
    (hypercloning: factor, ffn_factor, noise_snr_db, seed, dtype)."""
    return _operate("expand", ops.EXPAND_METHODS, src, dst, method, dry_run=dry_run, verify=verify, force=force,
                    shard_size=shard_size, tol=tol, progress=progress, options=options)


def shrink(src, dst=None, *, method: str = "select", dry_run: bool = False, verify: bool = False,
           force: bool = False, shard_size="5GB", tol: float = DEFAULT_TOL, progress=None, **options) -> dict:
    """Write a smaller model that keeps as much of `src` as the method can. Options: the target sizes
    hidden, ffn, heads, kv_heads, layers (left out: unchanged), seed, dtype; select: layer_selection,
    element_selection; subclone: calibration, calibration_tokens, scores."""
    return _operate("shrink", ops.SHRINK_METHODS, src, dst, method, dry_run=dry_run, verify=verify, force=force,
                    shard_size=shard_size, tol=tol, progress=progress, options=options)


def upcycle(src, dst=None, *, method: str = "moe", dry_run: bool = False, verify: bool = False,
            force: bool = False, shard_size="5GB", tol: float = DEFAULT_TOL, progress=None, **options) -> dict:
    """Turn a dense model into a mixture of experts."""
    return _operate("upcycle", ops.UPCYCLE_METHODS, src, dst, method, dry_run=dry_run, verify=verify, force=force,
                    shard_size=shard_size, tol=tol, progress=progress, options=options)


def verify(src, dst, *, tol: float = DEFAULT_TOL, seed: int = 0) -> dict:
    """Run source and target in transformers or timm and report how far apart they are."""
    return _verify(src, dst, tol=tol, seed=seed)
