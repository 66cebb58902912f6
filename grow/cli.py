"""The `grow` command: parse options, call the API, render the result (rich table or --json).

The API is imported by the commands, not here: `grow --help` and `grow --version` never load torch.
`grow inspect SRC` bypasses typer's parser (see main), which would load pydantic for it."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import traceback
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from . import DEFAULT_TOL, __version__
from .errors import GrowError, GrowWarning, Interrupted

if TYPE_CHECKING:
    from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
                  help="Grow or shrink a trained checkpoint into a model of another size.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        print(f"grow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False):
    """Grow or shrink a trained checkpoint into a model of another size."""


# Arguments are named in the usage line and described in each command's help (typer would list them
# with a type label of its own).
SRC = Annotated[str, typer.Argument(metavar="SRC", hidden=True)]
DST = Annotated[Optional[str], typer.Argument(metavar="DST", hidden=True)]
JSON = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (errors too).")]
QUIET = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or warnings on stderr.")]
DEBUG = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error (the exit code stays).")]
DRY = Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")]
VERIFY = Annotated[bool, typer.Option("--verify", help="Run grow verify on the result.")]
FORCE = Annotated[bool, typer.Option("--force", help="Replace DST if it exists.")]
SEED = Annotated[int, typer.Option(metavar="N", help="Seed for everything random (noise, new weights).")]
DTYPE = Annotated[Optional[str], typer.Option(metavar="DTYPE", help="Output dtype: float32, bfloat16 or float16 "
                                                                    "(default: the source's).")]
SHARD = Annotated[str, typer.Option(metavar="SIZE", help="Largest shard file, e.g. 5GB or 500MB.")]
TOL = Annotated[float, typer.Option(metavar="X", help="Largest relative error an exact method may show.")]
DEVICE = Annotated[str, typer.Option(metavar="DEVICE", help="Where verification and calibration run: cpu or cuda "
                                                              "(the same results).")]


def _int(help: str):
    return typer.Option(metavar="N", help=help)


def _float(help: str):
    return typer.Option(metavar="X", help=help)


def _text(help: str, metavar: str = "TEXT"):
    return typer.Option(metavar=metavar, help=help)


def handled(fn):
    """One sentence and an exit code for user errors (a JSON object on stdout with --json); the
    traceback too with --debug, the exit code unchanged."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GrowError as e:
            _fail(str(e), e.exit_code, kwargs)
        except KeyboardInterrupt as e:
            kept = str(e) if isinstance(e, Interrupted) else "nothing was written"
            how, code = ("terminated", 143) if _terminated else ("interrupted", 130)
            _fail(f"{how}; {kept}.", code, kwargs, prefix="")

    return wrapper


def _fail(message: str, code: int, kwargs: dict, prefix: str = "[bold red]error:[/] "):
    if kwargs.get("debug"):
        traceback.print_exc()
    if kwargs.get("json_"):
        print(json.dumps({"error": message, "exit_code": code}))
    err.print(f"{prefix}{message}", highlight=False)
    raise typer.Exit(code) from None


def _emit(result: dict, as_json: bool, render) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        render(result)


BYTE_STAGES = ("writing", "hashing", "reading")  # stages counted in bytes; the others count steps


def _progress(quiet: bool):
    """A progress callback progress(stage, done, total) drawing one line per stage on stderr, or None
    when stderr is no terminal or --quiet."""
    if quiet or not sys.stderr.isatty():
        return None, None
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, TimeElapsedColumn

    class Count(ProgressColumn):
        """Bytes for byte stages, "done/total" for the others."""

        def __init__(self):
            super().__init__()
            self.bytes, self.steps = DownloadColumn(), MofNCompleteColumn()

        def render(self, task):
            return (self.bytes if task.description in BYTE_STAGES else self.steps).render(task)

    bar = Progress("[progress.description]{task.description:<11}", BarColumn(), Count(), TimeElapsedColumn(),
                   console=err, transient=True)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int | None) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return bar, update


def _table(title: str, rows: list[tuple[str, object]]) -> Table:
    from rich.table import Table  # only where a table is drawn: not for --json

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


@app.command("inspect", short_help="Sizes, parameters, dtype and tie of a checkpoint.")
@handled
def inspect_cmd(src: SRC, json_: JSON = False, debug: DEBUG = False):
    """Architecture, sizes, parameter count, dtype and tie of the checkpoint SRC (a folder or hub id)."""
    from . import api

    _emit(api.inspect(src), json_, lambda r: out.print(_table(src, list(r.items()))))


def _render_operation(result: dict) -> None:
    plan = result["plan"]
    if "target" not in result:  # dry run
        rows = [("method", plan["method"]), ("exact", plan["exact"]), ("parameters", plan["parameters"]),
                ("bytes", plan["bytes"])]
        rows += [(f"{k}", f"{plan['source_sizes'].get(k)} -> {v}") for k, v in plan["target_sizes"].items()]
        rows += [(k, v) for k, v in plan.get("stats", {}).items()]
        out.print(_table(f"plan: {plan['operation']} {result['source']}", rows))
        _print_notes(plan)
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
    _print_notes(plan)
    if "verification" in result:
        _render_verification(result["verification"])


def _print_notes(plan: dict) -> None:
    """The plan's notes: among them why a result is not exact and how to make it exact."""
    for note in plan["notes"]:
        out.print(f"note: {note}", highlight=False)


def _render_verification(r: dict) -> None:
    keys = ["method", "exact_expected", "max_abs_diff", "rel_error", "top1_agreement", "kl", "loss_source", "loss_target",
            "beats_random_init", "first_divergent_layer"]
    rows = [(k, r[k]) for k in keys if r.get(k) is not None]
    if r.get("layers"):
        rows.append(("largest error after a layer", max(e["rel_error"] for e in r["layers"])))
    if r.get("dtype_check"):
        check = r["dtype_check"]
        rows.append((f"runs in {check['dtype']}", check["ran"]))
        if check["ran"]:
            rows.append((f"{check['dtype']}: rel_error", check["rel_error"]))
    for k, v in (r.get("baseline_random_init") or {}).items():
        if v is not None:
            rows.append((f"random init: {k}", v))
    rows.append(("passed", r["passed"]))
    out.print(_table(f"verify {r['target']}", rows))


@contextmanager
def _drawing(quiet: bool):
    """The progress callback for an API call, its lines drawn while the call runs."""
    bar, callback = _progress(quiet)
    if bar:
        bar.start()
    try:
        yield callback
    finally:
        if bar:
            bar.stop()


def _run_operation(name: str, src, dst, json_, quiet, **kwargs) -> dict:
    from . import api

    with _drawing(quiet) as callback, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GrowWarning)
        result = getattr(api, name)(src, dst, progress=callback, **kwargs)
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


@app.command(short_help="Write a larger model (hypercloning, lemon, stack, msg).")
@handled
def expand(
    src: SRC,
    dst: DST = None,
    method: Annotated[str, _text(
        "hypercloning (integer width factors, exact) | lemon (any width and depth, exact) | "
        "stack (G_stack depth, not exact) | msg (any dimension, exact with its masks).", "METHOD")] = "hypercloning",
    factor: Annotated[Optional[float], _int("Width factor for hypercloning, a whole number of at least 2.")] = None,
    ffn_factor: Annotated[Optional[float], _int("FFN width factor for hypercloning (default: --factor).")] = None,
    noise: Annotated[Optional[bool], typer.Option("--noise/--no-noise", help="hypercloning: split copies element-wise "
                                                  "at random so they separate under training (default on; exact forward).")] = None,
    noise_snr_db: Annotated[Optional[float], _float("SNR in dB of the element-wise split of copies (hypercloning, lemon; "
                                                    "default 10).")] = None,
    hidden: Annotated[Optional[int], _int("Target hidden size (lemon, msg).")] = None,
    ffn: Annotated[Optional[int], _int("Target FFN width (lemon, msg).")] = None,
    heads: Annotated[Optional[int], _int("Target query heads (lemon, msg); kv heads follow the group size.")] = None,
    kv_heads: Annotated[Optional[int], _int("Target kv heads (lemon, msg).")] = None,
    layers: Annotated[Optional[int], _int("Target depth (lemon, stack, msg).")] = None,
    ramp_steps: Annotated[Optional[int], _int("Optimizer steps over which each MSG mask ramps from 0 to 1 "
                                              "(default 1000).")] = None,
    seed: Annotated[Optional[int], _int("Seed for everything random (noise, splits, new weights; default 0).")] = None,
    dtype: DTYPE = None,
    shard_size: SHARD = "5GB",
    dry_run: DRY = False,
    verify: VERIFY = False,
    force: FORCE = False,
    tol: TOL = DEFAULT_TOL,
    json_: JSON = False,
    quiet: QUIET = False,
    debug: DEBUG = False,
):
    """Write into the folder DST a larger model that starts from what SRC (a folder or hub id) knows."""
    _run_operation("expand", src, dst, json_, quiet, method=method, factor=factor, ffn_factor=ffn_factor, noise=noise,
                   noise_snr_db=noise_snr_db, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers,
                   ramp_steps=ramp_steps, seed=seed, dtype=dtype, shard_size=shard_size, dry_run=dry_run,
                   verify=verify, force=force, tol=tol)


@app.command(short_help="Write a smaller model (select, subclone).")
@handled
def shrink(
    src: SRC,
    dst: DST = None,
    method: Annotated[str, _text("select (data-free) or subclone (data-driven).", "METHOD")] = "select",
    hidden: Annotated[Optional[int], _int("Target width of the residual stream.")] = None,
    ffn: Annotated[Optional[int], _int("Target FFN width.")] = None,
    heads: Annotated[Optional[int], _int("Target number of attention heads (whole heads).")] = None,
    kv_heads: Annotated[Optional[int], _int("Target number of kv heads (whole kv groups).")] = None,
    layers: Annotated[Optional[int], _int("Target number of layers.")] = None,
    experts: Annotated[Optional[int], _int("select: target number of experts of a mixture of experts.")] = None,
    layer_selection: Annotated[Optional[str], _text("select: first (default) or uniform.", "HOW")] = None,
    element_selection: Annotated[Optional[str], _text("select: uniform (default), first or random.", "HOW")] = None,
    calibration: Annotated[Optional[str], _text("subclone: text file or folder (images for timm) to measure "
                                                "activations on.", "PATH")] = None,
    calibration_tokens: Annotated[Optional[int], _int("subclone: calibration tokens (default 8192).")] = None,
    scores: Annotated[Optional[str], _text("subclone: importance scores file, reused if it exists, else written.",
                                           "FILE")] = None,
    layer_removal: Annotated[Optional[str], _text("subclone: loss (default: the layers whose skipping changes the "
                                                  "output least; one more calibration pass per layer), influence "
                                                  "(those that change the residual least; one pass) or middle.",
                                                  "HOW")] = None,
    residual: Annotated[Optional[str], _text("subclone: pca (default for RMSNorm models: rotate the residual onto its "
                                             "principal directions, then cut) or activation (keep the most active dims).",
                                             "HOW")] = None,
    unit_ranking: Annotated[Optional[str], _text("subclone: how FFN units and heads are ranked: activation (default: "
                                                 "mean |activation|) or contribution (times the weights they write "
                                                 "through).", "HOW")] = None,
    device: DEVICE = "cpu",
    seed: SEED = 0,
    dtype: DTYPE = None,
    shard_size: SHARD = "5GB",
    dry_run: DRY = False,
    verify: VERIFY = False,
    force: FORCE = False,
    tol: TOL = DEFAULT_TOL,
    json_: JSON = False,
    quiet: QUIET = False,
    debug: DEBUG = False,
):
    """Write into the folder DST a smaller model that keeps as much of SRC as the method can (sizes left out stay)."""
    _run_operation("shrink", src, dst, json_, quiet, method=method, hidden=hidden, ffn=ffn, heads=heads,
                   kv_heads=kv_heads, layers=layers, experts=experts, layer_selection=layer_selection,
                   element_selection=element_selection, calibration=calibration,
                   calibration_tokens=calibration_tokens, scores=scores, layer_removal=layer_removal,
                   residual=residual, unit_ranking=unit_ranking, seed=seed, dtype=dtype,
                   shard_size=shard_size, dry_run=dry_run, verify=verify, force=force, tol=tol, device=device)


@app.command(short_help="Turn a dense model into a mixture of experts.")
@handled
def upcycle(
    src: SRC,
    dst: DST = None,
    experts: Annotated[Optional[int], _int("Number of routed experts per sparse layer.")] = None,
    top_k: Annotated[Optional[int], _int("Experts each token uses (a multiple of --granularity).")] = None,
    granularity: Annotated[int, _int("Split the FFN into this many shards; groups of G experts share a "
                                     "router row.")] = 1,
    shared_expert: Annotated[bool, typer.Option("--shared-expert", help="Give one FFN slice to a shared expert "
                                                                        "(qwen2_moe).")] = False,
    format: Annotated[Optional[str], _text("mixtral, qwen2_moe or qwen3_moe (default: follows the source).",
                                           "FORMAT")] = None,
    router: Annotated[str, _text("New router weights: random or zero.", "INIT")] = "random",
    router_std: Annotated[float, _float("Standard deviation of a random router.")] = 0.02,
    expert_noise: Annotated[Optional[float], _float("Noise on each routed expert, relative to its RMS "
                                                    "(not exact).")] = None,
    moe_layers: Annotated[str, _text("Sparse layers: all, every-N ((i+1) % N == 0) or a list like 0,2,3.",
                                     "LAYERS")] = "all",
    renormalize: Annotated[bool, typer.Option("--renormalize/--no-renormalize",
                                              help="Renormalise the top-k router weights (Qwen MoE norm_topk_prob); "
                                                   "off is not exact.")] = True,
    method: Annotated[str, _text("moe (the only one).", "METHOD")] = "moe",
    seed: SEED = 0,
    dtype: DTYPE = None,
    shard_size: SHARD = "5GB",
    dry_run: DRY = False,
    verify: VERIFY = False,
    force: FORCE = False,
    tol: TOL = DEFAULT_TOL,
    json_: JSON = False,
    quiet: QUIET = False,
    debug: DEBUG = False,
):
    """Write into the folder DST a mixture of experts that starts out computing what the dense model SRC does."""
    _run_operation("upcycle", src, dst, json_, quiet, method=method, experts=experts, top_k=top_k,
                   granularity=granularity, shared_expert=shared_expert, format=format, router=router,
                   router_std=router_std, expert_noise=expert_noise, moe_layers=moe_layers, renormalize=renormalize,
                   seed=seed, dtype=dtype, shard_size=shard_size, dry_run=dry_run, verify=verify, force=force, tol=tol)


@app.command("verify", short_help="Run a source and an output side by side and compare.")
@handled
def verify_cmd(src: SRC, dst: Annotated[str, typer.Argument(metavar="DST", hidden=True)],
               tol: TOL = DEFAULT_TOL, seed: SEED = 0, device: DEVICE = "cpu", json_: JSON = False,
               quiet: QUIET = False, debug: DEBUG = False):
    """Run the source SRC and grow's output DST layer by layer in transformers or timm and report how far
    apart they are, after every layer and at the output (exit 3 if an exact method failed or DST does not
    run in its own dtype)."""
    from . import api

    with _drawing(quiet) as callback:
        report = api.verify(src, dst, tol=tol, seed=seed, device=device, progress=callback)
    _emit(report, json_, _render_verification)
    if not report["passed"]:
        err.print(f"error: {report['failure']}", highlight=False)
        raise typer.Exit(3)


@app.command("run", short_help="Run the jobs of a recipe file, or re-make an output.")
@handled
def run_cmd(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", hidden=True)],
    dst: Annotated[Optional[str], _text("With a grow.json: where to re-make that output.", "DIR")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace every job's DST that exists.")] = False,
    json_: JSON = False,
    quiet: QUIET = False,
    debug: DEBUG = False,
):
    """Run the jobs of the recipe file RECIPE (YAML/JSON with a 'jobs' list) in order, or re-make an output
    from its grow.json."""
    from . import api

    with _drawing(quiet) as callback:
        results = api.run(recipe, dst=dst, force=force, progress=callback)
    if json_:
        print(json.dumps(results, indent=2, default=str))
        return
    for r in results:
        (_render_verification if r["command"] == "verify" else _render_operation)(r)


_terminated: list[int] = []  # the SIGTERM that stopped the run, if one did


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (a job scheduler, `kill`) stops grow the way Ctrl-C does: the half-written output is
    removed; the exit code is 143, as for a process killed by SIGTERM."""
    _terminated.append(signum)
    raise KeyboardInterrupt


INSPECT_FLAGS = {"--json": "json_", "--debug": "debug"}


def _plain_inspect(args: list[str]) -> dict | None:
    """The options of a command line that is `inspect SRC` with no more than --json and --debug; None for
    any other (help, other options or commands), which typer parses. typer takes longer to parse SRC than
    grow inspect takes to run: it loads pydantic to check that a string is a string."""
    if args[:1] != ["inspect"]:
        return None
    flags = [a for a in args[1:] if a.startswith("-")]
    sources = [a for a in args[1:] if not a.startswith("-")]
    if len(sources) != 1 or len(set(flags)) != len(flags) or not set(flags) <= INSPECT_FLAGS.keys():
        return None
    return {"src": sources[0], **{INSPECT_FLAGS[f]: True for f in flags}}


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    options = _plain_inspect(sys.argv[1:])
    if options is None:
        app()
        return
    try:
        inspect_cmd(**options)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except BrokenPipeError:  # the reader stopped reading (| head): exit 1 and say nothing, as typer does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
