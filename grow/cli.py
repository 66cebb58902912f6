"""The `grow` command: parse options, call the API, render the result (rich table or --json)."""

from __future__ import annotations

import functools
import json
import sys
import warnings
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import api
from .errors import GrowError, GrowWarning

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Grow or shrink a trained checkpoint into a model of another size.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

JSON = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
QUIET = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or logs on stderr.")]
DEBUG = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")]
DRY = Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")]
VERIFY = Annotated[bool, typer.Option("--verify", help="Run grow verify on the result.")]
FORCE = Annotated[bool, typer.Option("--force", help="Replace DST if it exists.")]
SEED = Annotated[int, typer.Option(help="Seed for everything random (noise, new weights).")]
DTYPE = Annotated[Optional[str], typer.Option(help="Output dtype: float32, bfloat16 or float16 (default: the source's).")]
SHARD = Annotated[str, typer.Option(help="Largest shard file, e.g. 5GB or 500MB.")]
TOL = Annotated[float, typer.Option(help="Largest relative error an exact method may show.")]


def handled(fn):
    """One sentence and an exit code for user errors; a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except GrowError as e:
            if debug:
                raise
            err.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written.")
            raise typer.Exit(130) from None

    return wrapper


def _emit(result: dict, as_json: bool, render) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        render(result)


def _progress(quiet: bool):
    """A progress callback progress(stage, done, total) drawing one line per stage on stderr, or None
    when stderr is no terminal or --quiet."""
    if quiet or not sys.stderr.isatty():
        return None, None
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   console=err, transient=True)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int | None) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return bar, update


def _table(title: str, rows: list[tuple[str, object]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, _fmt(v))
    return table


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


@app.command("inspect")
@handled
def inspect_cmd(src: str, json_: JSON = False, debug: DEBUG = False):
    """Architecture, sizes, parameter count, dtype and tie of a checkpoint."""
    _emit(api.inspect(src), json_, lambda r: out.print(_table(src, list(r.items()))))


def _render_operation(result: dict) -> None:
    plan = result["plan"]
    if "target" not in result:  # dry run
        rows = [("method", plan["method"]), ("exact", plan["exact"]), ("parameters", plan["parameters"]),
                ("bytes", plan["bytes"])]
        rows += [(f"{k}", f"{plan['source_sizes'].get(k)} -> {v}") for k, v in plan["target_sizes"].items()]
        rows += [(k, v) for k, v in plan.get("stats", {}).items()]
        out.print(_table(f"plan: {plan['operation']} {result['source']}", rows))
        for note in plan["notes"]:
            out.print(f"note: {note}", highlight=False)
        # one plain line per tensor: names and recipes are never cut to fit a table
        width = max(len(r["name"]) for r in plan["tensors"])
        out.print(f"\n{'tensor':<{width}}  {'shape':<14} dtype  recipe", style="bold", highlight=False)
        for r in plan["tensors"]:
            shape = "x".join(map(str, r["shape"]))
            out.print(f"{r['name']:<{width}}  {shape:<14} {r['dtype']:<5}  {r['recipe']}", highlight=False)
        return
    rows = [("method", plan["method"]), ("exact", plan["exact"]), ("target", result["target"]),
            ("source parameters", result["source_parameters"]), ("target parameters", result["target_parameters"]),
            ("seconds", result["seconds"]), ("written (MB)", result["bytes_written"] / 1e6),
            ("peak RSS (MB)", result["peak_rss_bytes"] / 1e6)]
    out.print(_table(f"{plan['operation']}: {result['source']}", rows))
    if "verification" in result:
        _render_verification(result["verification"])


def _render_verification(r: dict) -> None:
    keys = ["method", "exact_expected", "max_abs_diff", "rel_error", "top1_agreement", "kl", "loss_source", "loss_target",
            "beats_random_init"]
    rows = [(k, r[k]) for k in keys if r.get(k) is not None]
    for k, v in (r.get("baseline_random_init") or {}).items():
        if v is not None:
            rows.append((f"random init: {k}", v))
    rows.append(("passed", r["passed"]))
    out.print(_table(f"verify {r['target']}", rows))


def _run_operation(fn, src, dst, json_, quiet, **kwargs) -> dict:
    bar, callback = _progress(quiet)
    if bar:
        bar.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GrowWarning)
            result = fn(src, dst, progress=callback, **kwargs)
    finally:
        if bar:
            bar.stop()
    for w in caught:
        if not issubclass(w.category, GrowWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        elif not quiet:
            err.print(f"[yellow]warning:[/] {w.message}", highlight=False)
    _emit(result, json_, _render_operation)
    if result.get("verification") and not result["verification"]["passed"]:
        err.print(f"error: verification failed: relative error {result['verification']['rel_error']:.3g} "
                  f"exceeds {result['verification']['tolerance']:g}.")
        raise typer.Exit(3)
    return result


@app.command()
@handled
def expand(
    src: str,
    dst: Annotated[Optional[str], typer.Argument()] = None,
    method: Annotated[str, typer.Option(
        help="hypercloning (integer width factors, exact) | lemon (any width and depth, exact) | "
             "stack (G_stack depth, not exact) | msg (any dimension, exact with its masks)")] = "hypercloning",
    factor: Annotated[Optional[float], typer.Option(help="Width factor (hypercloning; whole number >= 2).")] = None,
    ffn_factor: Annotated[Optional[float], typer.Option(help="FFN width factor (hypercloning; default --factor).")] = None,
    noise: Annotated[Optional[bool], typer.Option("--noise/--no-noise", help="hypercloning: split copies element-wise at random so they separate under training (default on; exact forward).")] = None,
    noise_snr_db: Annotated[Optional[float], typer.Option(help="SNR in dB of the element-wise split of copies (hypercloning, lemon; default 10).")] = None,
    hidden: Annotated[Optional[int], typer.Option(help="Target hidden size (lemon, msg).")] = None,
    ffn: Annotated[Optional[int], typer.Option(help="Target FFN width (lemon, msg).")] = None,
    heads: Annotated[Optional[int], typer.Option(help="Target query heads (lemon, msg); kv heads follow the group size.")] = None,
    kv_heads: Annotated[Optional[int], typer.Option(help="Target kv heads (lemon, msg).")] = None,
    layers: Annotated[Optional[int], typer.Option(help="Target depth (lemon, stack, msg).")] = None,
    ramp_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps over which each MSG mask ramps 0 -> 1 (default 1000).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for everything random (noise, splits, new weights; default 0).")] = None,
    dtype: DTYPE = None,
    shard_size: SHARD = "5GB",
    dry_run: DRY = False,
    verify: VERIFY = False,
    force: FORCE = False,
    tol: TOL = api.DEFAULT_TOL,
    json_: JSON = False,
    quiet: QUIET = False,
    debug: DEBUG = False,
):
    """Write a larger model that starts from what SRC knows."""
    _run_operation(api.expand, src, dst, json_, quiet, method=method, factor=factor, ffn_factor=ffn_factor, noise=noise,
                   noise_snr_db=noise_snr_db, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers,
                   ramp_steps=ramp_steps, seed=seed, dtype=dtype, shard_size=shard_size, dry_run=dry_run,
                   verify=verify, force=force, tol=tol)


@app.command()
@handled
def shrink(
    src: str,
    dst: Annotated[Optional[str], typer.Argument()] = None,
    method: Annotated[str, typer.Option(help="select (data-free) or subclone (data-driven).")] = "select",
    hidden: Annotated[Optional[int], typer.Option(help="Target width of the residual stream.")] = None,
    ffn: Annotated[Optional[int], typer.Option(help="Target FFN width.")] = None,
    heads: Annotated[Optional[int], typer.Option(help="Target number of attention heads (whole heads).")] = None,
    kv_heads: Annotated[Optional[int], typer.Option(help="Target number of kv heads (whole kv groups).")] = None,
    layers: Annotated[Optional[int], typer.Option(help="Target number of layers.")] = None,
    experts: Annotated[Optional[int], typer.Option(help="select: target number of experts of a mixture of experts.")] = None,
    layer_selection: Annotated[Optional[str], typer.Option(help="select: first (default) or uniform.")] = None,
    element_selection: Annotated[Optional[str], typer.Option(help="select: uniform (default), first or random.")] = None,
    calibration: Annotated[Optional[str], typer.Option(help="subclone: text file or folder (images for timm) to measure activations on.")] = None,
    calibration_tokens: Annotated[Optional[int], typer.Option(help="subclone: calibration tokens (default 8192).")] = None,
    scores: Annotated[Optional[str], typer.Option(help="subclone: importance scores file, reused if it exists, else written.")] = None,
    layer_removal: Annotated[Optional[str], typer.Option(help="subclone: influence (default: the layers that change the residual least) or middle.")] = None,
    residual: Annotated[Optional[str], typer.Option(help="subclone: pca (default for RMSNorm models: rotate the residual onto its principal directions, then cut) or activation (keep the most active dims).")] = None,
    seed: SEED = 0,
    dtype: DTYPE = None,
    shard_size: SHARD = "5GB",
    dry_run: DRY = False,
    verify: VERIFY = False,
    force: FORCE = False,
    tol: TOL = api.DEFAULT_TOL,
    json_: JSON = False,
    quiet: QUIET = False,
    debug: DEBUG = False,
):
    """Write a smaller model that keeps as much of SRC as the method can (sizes left out stay)."""
    _run_operation(api.shrink, src, dst, json_, quiet, method=method, hidden=hidden, ffn=ffn, heads=heads,
                   kv_heads=kv_heads, layers=layers, experts=experts, layer_selection=layer_selection,
                   element_selection=element_selection, calibration=calibration,
                   calibration_tokens=calibration_tokens, scores=scores, layer_removal=layer_removal,
                   residual=residual, seed=seed, dtype=dtype,
                   shard_size=shard_size, dry_run=dry_run, verify=verify, force=force, tol=tol)


@app.command()
@handled
def upcycle(
    src: str,
    dst: Annotated[Optional[str], typer.Argument()] = None,
    experts: Annotated[Optional[int], typer.Option(help="Number of routed experts per sparse layer.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Experts each token uses (a multiple of --granularity).")] = None,
    granularity: Annotated[int, typer.Option(help="Split the FFN into this many shards; groups of G experts share a router row.")] = 1,
    shared_expert: Annotated[bool, typer.Option("--shared-expert", help="Give one FFN slice to a shared expert (qwen2_moe).")] = False,
    format: Annotated[Optional[str], typer.Option("--format", help="mixtral, qwen2_moe or qwen3_moe (default: follows the source).")] = None,
    router: Annotated[str, typer.Option(help="New router weights: random or zero.")] = "random",
    router_std: Annotated[float, typer.Option(help="Standard deviation of a random router.")] = 0.02,
    expert_noise: Annotated[Optional[float], typer.Option(help="Noise on each routed expert, relative to its RMS (not exact).")] = None,
    moe_layers: Annotated[str, typer.Option(help="Sparse layers: all, every-N ((i+1) % N == 0) or a list like 0,2,3.")] = "all",
    renormalize: Annotated[bool, typer.Option("--renormalize/--no-renormalize", help="Renormalise the top-k router weights (Qwen MoE norm_topk_prob); off is not exact.")] = True,
    method: Annotated[str, typer.Option(help="moe")] = "moe",
    seed: SEED = 0,
    dtype: DTYPE = None,
    shard_size: SHARD = "5GB",
    dry_run: DRY = False,
    verify: VERIFY = False,
    force: FORCE = False,
    tol: TOL = api.DEFAULT_TOL,
    json_: JSON = False,
    quiet: QUIET = False,
    debug: DEBUG = False,
):
    """Turn the dense model SRC into a mixture of experts that starts out computing the same function."""
    _run_operation(api.upcycle, src, dst, json_, quiet, method=method, experts=experts, top_k=top_k,
                   granularity=granularity, shared_expert=shared_expert, format=format, router=router,
                   router_std=router_std, expert_noise=expert_noise, moe_layers=moe_layers, renormalize=renormalize,
                   seed=seed, dtype=dtype, shard_size=shard_size, dry_run=dry_run, verify=verify, force=force, tol=tol)


@app.command("verify")
@handled
def verify_cmd(src: str, dst: str, tol: TOL = api.DEFAULT_TOL, seed: SEED = 0, json_: JSON = False,
               quiet: QUIET = False, debug: DEBUG = False):
    """Run SRC and DST in transformers or timm and report how far apart they are (exit 3 if an exact method failed)."""
    report = api.verify(src, dst, tol=tol, seed=seed)
    _emit(report, json_, _render_verification)
    if not report["passed"]:
        err.print(f"error: {dst} does not reproduce {src}: relative error {report['rel_error']:.3g} exceeds {tol:g}.")
        raise typer.Exit(3)


@app.command("run")
@handled
def run_cmd(
    recipe: Annotated[str, typer.Argument(help="A recipe file (YAML/JSON with a 'jobs' list) or an output's grow.json.")],
    dst: Annotated[Optional[str], typer.Option(help="With a grow.json: where to re-make that output.")] = None,
    json_: JSON = False,
    quiet: QUIET = False,
    debug: DEBUG = False,
):
    """Run the jobs of a recipe file in order, or re-make an output from its grow.json."""
    bar, callback = _progress(quiet)
    if bar:
        bar.start()
    try:
        results = api.run(recipe, dst=dst, progress=callback)
    finally:
        if bar:
            bar.stop()
    if json_:
        print(json.dumps(results, indent=2, default=str))
        return
    for r in results:
        (_render_verification if r["command"] == "verify" else _render_operation)(r)


def main() -> None:
    app()
