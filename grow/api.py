"""The Python interface; the CLI is a thin layer over these functions.

Importing this module does not import torch or transformers (`grow --help` and `grow inspect` stay
fast); the modules that build tensors are imported by the functions that need them."""

from __future__ import annotations

import inspect as _inspect
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import DEFAULT_TOL, recipes
from .arch.view import ModelView
from .checkpoint import DTYPE_LABELS, Source, StreamHasher
from .errors import GrowError, Interrupted, UsageError, VerificationFailed
from .writer import parse_size

if TYPE_CHECKING:
    from .plan import Plan


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark (VmHWM; unlike ru_maxrss it does not carry a
    parent's peak across exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def inspect(src) -> dict:
    """Architecture, every size an operator changes (under the config's own key names; the sizes of a
    model built of stages as one list per kind, stage by stage), parameters, dtype, tie."""
    view = ModelView(Source(src))
    out = {"architecture": view.architecture, "family": view.spec.family}
    for name, sk in view.spec.sizes.items():
        if sk.stage is not None:  # one list per kind of per-stage size, under the config list's name (dims, depths)
            listed = sk.key and not sk.ratio_of and sk.key.endswith(f".{sk.stage}")
            out.setdefault(sk.key.split(".")[-2] if listed else sk.kind, []).append(view.sizes[name])
            continue
        key = sk.key.rsplit(".", 1)[-1] if sk.key and not sk.ratio_of else name
        out[key] = view.sizes[name]
    out["parameters"] = view.source.num_parameters
    out["dtype"] = DTYPE_LABELS[view.source.dtype]
    out[view.spec.tie_key or "tie_word_embeddings"] = view.tied
    return out


def _build(builder: Callable[..., Plan], view: ModelView, method: str, options: dict, progress=None, device="cpu") -> Plan:
    accepted = _inspect.signature(builder).parameters
    for key, value in options.items():
        if value is not None and key not in accepted:
            raise UsageError(f"--{key.replace('_', '-')} does not apply to --method {method}.")
    options = {k: v for k, v in options.items() if v is not None}
    if "importance" in accepted and "importance" not in options:  # a data-driven builder: measuring reads (and may save) files, so it happens here
        from . import calibrate

        options["importance"] = calibrate.importance(
            view, calibration=options.get("calibration"), tokens=options.get("calibration_tokens", calibrate.DEFAULT_TOKENS),
            scores=options.get("scores"), seed=options.get("seed", 0), progress=progress, device=device,
            layer_loss=_wants_layer_loss(view, options))
    from .plan import torch_threads

    with torch_threads():  # planning is many small ops
        return builder(view, **options)


def _wants_layer_loss(view: ModelView, options: dict) -> bool:
    """Whether subcloning removes layers by skip loss (measured only then: one more pass per layer)."""
    from .ops.subclone import layer_removal_method

    layers = options.get("layers")
    cut = isinstance(layers, int) and 0 < layers < view.sizes.get("layers", 0)
    return cut and layer_removal_method(view, options.get("layer_removal"), []) == "loss"


def _check_operation(view: ModelView, operation: str, method: str) -> None:
    """The spec's `operations` list the methods that apply to its family (none listed: all of them)."""
    allowed = view.spec.operations
    if allowed is None or method in allowed.get(operation, ()):
        return
    if not any(allowed.values()):
        raise UsageError(f"grow can only inspect a {view.architecture} checkpoint; it cannot {operation} one.")
    can = "; ".join(f"{op} --method {' or '.join(methods)}" for op, methods in allowed.items() if methods)
    raise UsageError(f"grow cannot {operation} a {view.architecture} checkpoint with --method {method}; it can {can}.")


def _operate(operation: str, src, dst, method: str, *, dry_run: bool, verify: bool, force: bool,
             shard_size, tol: float, progress, options: dict, device="cpu") -> dict:
    if dst is None and not dry_run:
        raise UsageError(f"{operation} needs a target folder (or --dry-run).")
    shard_bytes = parse_size(shard_size)
    source = Source(src)
    # the source's sha256 (for grow.json) is computed while torch and the operators import
    hasher = None if dry_run else StreamHasher(source.hashed_files())
    written = False  # from here on an interrupt leaves the output complete, and says so
    try:
        try:
            if hasher:
                hasher.hash_ahead()
            from . import ops
            from .plan import execute

            methods = ops.METHODS[operation]
            if method not in methods:
                raise UsageError(f"--method {method} is not a way to {operation}; choose one of {', '.join(methods)}.")
            view = ModelView(source)
            _check_operation(view, operation, method)
            if view.spec.single_file:
                shard_bytes = None
            start = time.perf_counter()  # the reported seconds include calibration
            plan = _build(methods[method], view, method, options, progress, device)
            plan.check_rounding(source)
            result = {"source": source.id, "source_parameters": source.num_parameters, "plan": plan.summary()}
            if dry_run:
                return result
            stats = execute(plan, source, Path(dst), shard_size=shard_bytes, force=force, progress=progress,
                            hasher=hasher)
            written = True
        finally:
            if hasher:
                hasher.take_over()  # (stops the thread, if nothing did)
            source.close()  # calibration and the executor read through it
        result.update(
            target=str(Path(dst).resolve()),
            target_parameters=plan.num_parameters,
            seconds=time.perf_counter() - start,
            bytes_written=stats["bytes"],
            files=stats["files"],
            peak_rss_bytes=peak_rss_bytes(),
        )
        del result["plan"]["tensors"]
        if verify:
            from .verify import verify as _verify

            result["verification"] = _verify(source.path, dst, tol=tol, device=device, progress=progress)
    except KeyboardInterrupt:
        if not written:
            raise
        cut = "; only its verification was cut short" if verify else ""
        raise Interrupted(f"{Path(dst).resolve()} is complete{cut}") from None
    return result


def expand(src, dst=None, *, method: str = "hypercloning", dry_run: bool = False, verify: bool = False,
           force: bool = False, shard_size="5GB", tol: float = DEFAULT_TOL, progress=None, device="cpu", **options) -> dict:
    """Write a larger model that starts from what `src` knows. Options depend on the method
    (hypercloning: factor, ffn_factor, noise, noise_snr_db, seed, dtype; lemon: hidden, ffn, heads, kv_heads,
    layers, split ("element" or "column"), noise_snr_db, seed, dtype; stack: layers, dtype; msg: hidden, ffn,
    heads, kv_heads, layers, ramp_steps, seed, dtype)."""
    return _operate("expand", src, dst, method, dry_run=dry_run, verify=verify, force=force,
                    shard_size=shard_size, tol=tol, progress=progress, options=options, device=device)


def shrink(src, dst=None, *, method: str = "select", dry_run: bool = False, verify: bool = False,
           force: bool = False, shard_size="5GB", tol: float = DEFAULT_TOL, progress=None, device="cpu", **options) -> dict:
    """Write a smaller model that keeps as much of `src` as the method can. Options: the target sizes
    hidden, ffn, heads, kv_heads, layers (left out: unchanged), seed, dtype; select: layer_selection,
    element_selection; subclone: calibration, calibration_tokens, scores."""
    return _operate("shrink", src, dst, method, dry_run=dry_run, verify=verify, force=force,
                    shard_size=shard_size, tol=tol, progress=progress, options=options, device=device)


def upcycle(src, dst=None, *, method: str = "moe", dry_run: bool = False, verify: bool = False,
            force: bool = False, shard_size="5GB", tol: float = DEFAULT_TOL, progress=None, device="cpu", **options) -> dict:
    """Turn a dense model into a mixture of experts that starts out computing what `src` did. Options
    (moe): experts, top_k, granularity, shared_expert, format, router, router_std, expert_noise, moe_layers,
    renormalize, seed, dtype."""
    return _operate("upcycle", src, dst, method, dry_run=dry_run, verify=verify, force=force,
                    shard_size=shard_size, tol=tol, progress=progress, options=options, device=device)


def run(recipe, *, dst=None, force: bool = False, progress=None) -> list[dict]:
    """Run every job of a recipe file in order (or re-make an output from its grow.json into dst);
    force replaces every job's existing target. A failing or interrupted job stops the run with a
    message that names it and the jobs that completed, whose outputs stay complete."""
    results = []
    done: list[str] = []  # what each completed job did, for the message of a run that stops
    for k, (command, args) in enumerate(recipes.load_jobs(recipe, dst), 1):
        fn = {"expand": expand, "shrink": shrink, "upcycle": upcycle, "verify": verify}[command]
        label = f"job {k} ({recipes.describe(command, args)})"
        kwargs = {key: v for key, v in args.items() if key not in ("src", "dst")}
        kwargs["progress"] = progress
        if force and command != "verify":
            kwargs["force"] = True
        try:
            result = fn(args["src"], args["dst"], **kwargs)
        except GrowError as e:
            raise type(e)(_stopped(label, str(e), done)) from None
        except TypeError as e:
            raise UsageError(_stopped(label, str(e), done)) from None
        except KeyboardInterrupt as e:
            kept = str(e) if isinstance(e, Interrupted) else "its output was not written"
            raise Interrupted(_stopped(label, kept, done).rstrip(".")) from None
        results.append({"job": k, "command": command, **result})
        report = result if command == "verify" else result.get("verification")
        if report and not report["passed"]:
            raise VerificationFailed(_stopped(label, report["failure"], done))
        done.append(f"job {k} verified {args['dst']}" if command == "verify" else f"job {k} wrote {result['target']}")
    return results


def _stopped(label: str, message: str, done: list[str]) -> str:
    """The message of a run stopped by the job `label`, with what the jobs before it completed."""
    kept = f"; before it, {', '.join(done)} (complete)" if done else ""
    return f"{label}: {message.rstrip('.')}{kept}."


def verify(src, dst, *, tol: float = DEFAULT_TOL, seed: int = 0, device="cpu", progress=None) -> dict:
    """Run source and target layer by layer in transformers or timm (memory bounded by one layer) and
    report how far apart they are, at the output and after every layer (`layers`, `first_divergent_layer`),
    and whether the target runs in its own dtype (`dtype_check`); device: cpu or cuda."""
    try:
        from .verify import verify as _verify

        return _verify(src, dst, tol=tol, seed=seed, device=device, progress=progress)
    except KeyboardInterrupt:
        raise Interrupted("verify writes nothing, and nothing was changed") from None
