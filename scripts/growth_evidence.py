"""Does growing pay off in training? Evidence for every growth path, against two baselines.

Trains a small Llama (the source) on the Python standard library with its own BPE tokenizer, grows it
by every path grow has (HyperCloning x2, LEMON to a width that is not a multiple plus more layers,
G_stack to twice the depth, MSG with grow.runtime ramping its masks, MoE upcycling plain and
fine-grained), and trains each grown model and a random-init model of the same shape with the same
AdamW, warmup + cosine schedule, batches and data order on text no model has seen. The second
baseline is the source itself trained on for the same FLOPs. Held-out loss is measured on files that
nothing is trained on. Writes the raw curves (JSON), a plot (PNG, needs matplotlib: pip install
'grow[evidence]') and prints a Markdown table.

    python scripts/growth_evidence.py [--work DIR] [--out docs/growth_evidence] [--steps N] [--quick]

Every model trains on one thread; --jobs runs that many trainings at once (default 2)."""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import grow
from grow import training
from grow.runtime import load_masks

FRACTIONS = (0.0, 0.1, 0.25, 0.5, 1.0)  # of the post-growth training, for the table


@dataclass(frozen=True)
class Setup(training.Shape):
    vocab: int = 1024
    source_steps: int = 1500
    source_lr: float = 3e-3
    steps: int = 600  # after growth, for every compared model
    lr: float = 3e-3  # after growth, for every model: the scratch baseline's best of those tried (README)
    warmup: int = 300  # half the training: the scratch baseline's best of those tried
    evals: int = 12  # held-out measurements per training run
    eval_windows: int = 128


QUICK = dict(source_steps=300, steps=120, warmup=60, evals=6, eval_windows=64)


@dataclass
class Path_:
    """One growth path: how to make the grown model from the source and which random-init twin it has."""

    name: str
    operation: str  # expand | upcycle
    options: dict
    twin: str  # name of the scratch model of the same shape
    masks: bool = False
    label: str = ""
    lr: float | None = None  # a peak learning rate of its own (the scratch twin keeps the shared one)
    plotted: bool = True  # variants that answer a question about a default are in the table only


def paths(setup: Setup, snr: float | None) -> list[Path_]:
    h, f, L = setup.hidden, setup.ffn, setup.layers
    wide = dict(hidden=h * 3 // 2, ffn=f * 3 // 2, layers=L * 3 // 2)  # 1.5x: LEMON's non-multiple case
    noise = {} if snr is None else {"noise_snr_db": snr}
    return [
        Path_("hypercloning", "expand", dict(method="hypercloning", factor=2, **noise), "scratch_x2",
              label="HyperCloning x2 (default: element-wise split)"),
        Path_("hypercloning_no_noise", "expand", dict(method="hypercloning", factor=2, noise=False), "scratch_x2",
              label="HyperCloning x2 --no-noise", plotted=False),
        *[Path_(f"hypercloning_snr{db:g}", "expand", dict(method="hypercloning", factor=2, noise_snr_db=db), "scratch_x2",
                label=f"HyperCloning x2 --noise-snr-db {db:g}", plotted=False) for db in (0.0, 20.0)],
        Path_("hypercloning_low_lr", "expand", dict(method="hypercloning", factor=2, **noise), "scratch_x2",
              lr=setup.lr / 3, label=f"HyperCloning x2 at its own peak lr {setup.lr / 3:.2g} (scratch keeps {setup.lr:g})"),
        Path_("lemon", "expand", dict(method="lemon", **wide, **noise), "scratch_wide",
              label=f"LEMON to {wide['hidden']}/{wide['ffn']}/{wide['layers']} layers (element-wise split)"),
        Path_("lemon_column", "expand", dict(method="lemon", split="column", **wide), "scratch_wide",
              label="LEMON, unequal column split (before)", plotted=False),
        Path_("msg", "expand", dict(method="msg", **wide, ramp_steps=max(1, setup.steps // 8)), "scratch_wide",
              masks=True, label="MSG, masks ramped by grow.runtime"),
        Path_("stack", "expand", dict(method="stack", layers=2 * L), "scratch_deep", label=f"G_stack to {2 * L} layers"),
        Path_("moe", "upcycle", dict(experts=4, top_k=2), "scratch_moe", label="MoE upcycling, 4 experts top-2"),
        Path_("moe_fine", "upcycle", dict(experts=8, top_k=4, granularity=2), "scratch_moe_fine",
              label="MoE upcycling, fine-grained: 8 experts top-4, granularity 2"),
    ]


# ---- data ------------------------------------------------------------------------------------------

def stdlib_files() -> list[Path]:
    """Every stdlib module outside the tests and site-packages, in a fixed mixed order (by content
    hash of the path), without the held-out files."""
    files = [p for p in training.STDLIB.rglob("*.py")
             if not ({"site-packages", "test", "tests", "idle_test"} & set(p.parts)) and p.name not in training.HELD_OUT_FILES]
    return sorted(files, key=lambda p: hashlib.sha1(str(p.relative_to(training.STDLIB)).encode()).hexdigest())


def prepare_data(work: Path, setup: Setup) -> dict[str, torch.Tensor]:
    """Tokenizer (trained on the source's text), the source's training stream, the disjoint stream
    every model trains on after growth, and the held-out windows; cached in work/data.pt."""
    cache = work / "data.pt"
    if cache.is_file():
        return torch.load(cache)
    files = stdlib_files()
    sizes = [p.stat().st_size for p in files]
    # the source trains on the first part, the grown models on the rest: text seen once by every model
    need = setup.source_steps * setup.batch * setup.seq * 4  # ~4 bytes per token with a 1k BPE, with margin
    cut = next((i for i in range(len(files)) if sum(sizes[:i]) >= need), len(files) // 2)
    tok = training.train_tokenizer(work / "source", files[:cut], setup.vocab)
    data = {"source": training.encode(tok, files[:cut]), "growth": training.encode(tok, files[cut:]),
            "held_out": training.held_out_windows(tok, setup.seq, setup.eval_windows)}
    torch.save(data, cache)
    return data


def batches(stream: torch.Tensor, setup: Setup, steps: int) -> torch.Tensor:
    """[steps, batch, seq]: the stream cut into windows, in one fixed shuffled order (the same for every
    model), each token seen at most once. Shuffled because the stdlib in file order has long stretches
    unlike the rest (tables of encodings, data modules) that swing every model's held-out loss."""
    windows = stream[: stream.numel() // setup.seq * setup.seq].view(-1, setup.seq)
    need = steps * setup.batch
    if len(windows) < need:
        raise SystemExit(f"the text has {len(windows)} windows of {setup.seq} tokens, too few for {steps} steps of "
                         f"{setup.batch}: use fewer steps.")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[:need]
    return windows[order].view(steps, setup.batch, setup.seq)


# ---- FLOPs -------------------------------------------------------------------------------------------

def flops_per_token(model, seq: int) -> float:
    """Training FLOPs per token: 6 x (matmul weights a token uses) + 6 x layers x context x attention width
    (the usual estimate; routed experts count top_k / experts of their weights)."""
    cfg = model.config
    active = 0.0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or p.dim() < 2:
            continue
        share = 1.0
        if ".experts." in name:
            share = cfg.num_experts_per_tok / (getattr(cfg, "num_local_experts", None) or cfg.num_experts)
        active += p.numel() * share
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 6 * active + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq


# ---- symmetry ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Copies:
    """Blocks of a weight that started as copies: rows [0, count) and [offset, offset + count) (or, with
    layers, the same weight in layer i and i + offset); fold: sum the column pieces that read the copies
    of a width-`fold` input first; cols: compare only the first cols columns (later ones are new)."""

    pattern: str
    count: int
    offset: int
    fold: int | None = None
    cols: int | None = None
    layers: bool = False


def copy_structure(path: Path_, setup: Setup) -> dict[str, Copies]:
    h, f, L = setup.hidden, setup.ffn, setup.layers
    up = "model.layers.{i}.mlp.up_proj.weight"
    if path.name.startswith("hypercloning"):
        return {"embedding (hidden copies)": Copies("model.embed_tokens.weight.T", h, h),
                "FFN units (up_proj rows)": Copies(up, f, f, fold=h)}
    if path.name.startswith("lemon"):
        return {"FFN units (up_proj rows)": Copies(up, path.options["ffn"] - f, f, cols=h)}
    if path.name.startswith("moe"):
        g = path.options.get("granularity", 1)
        return {"experts of one FFN slice": Copies("model.layers.{i}.mlp.experts.gate_up_proj", 1, g)}
    if path.name == "stack":
        return {"layer i vs i + L (up_proj)": Copies(up, L, L, layers=True)}
    return {}


def measure_separation(model, copies: dict[str, Copies]) -> dict[str, float]:
    """Relative difference ||a - b|| / ||a|| between blocks that started as copies, averaged over layers:
    0 at step 0 for every exact path (a split reader's pieces are summed first)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    params.update({n + ".T": p.T for n, p in params.items() if p.dim() == 2})
    layers = model.config.num_hidden_layers
    out = {}
    for what, c in copies.items():
        values = []
        for i in range(layers if "{i}" in c.pattern else 1):
            if c.layers:
                if i >= c.offset:
                    break
                a, b = params[c.pattern.format(i=i)], params[c.pattern.format(i=i + c.offset)]
            else:
                w = params[c.pattern.format(i=i)]
                if c.fold:
                    w = w.reshape(w.shape[0], -1, c.fold).sum(1)
                if c.cols:
                    w = w[:, :c.cols]
                a, b = w[:c.count], w[c.offset:c.offset + c.count]
            values.append(((a - b).norm() / a.norm()).item())
        out[what] = sum(values) / len(values)
    return out


# ---- training ----------------------------------------------------------------------------------------

@dataclass
class Run:
    name: str
    folder: str  # grown checkpoint to start from, or (random_init) the folder whose config to use
    steps: int
    lr: float
    warmup: int
    random_init: bool = False
    masks: bool = False
    seed: int = 1
    options: dict = field(default_factory=dict)  # how the start was made (part of the cache key)
    basis: str = ""  # sha1 of the source weights and of the batch order code (part of the cache key)
    copies: dict = field(default_factory=dict)
    save_to: str | None = None
    curve: list = field(default_factory=list)  # [step, training FLOPs, held-out loss]
    separation_start: dict = field(default_factory=dict)
    separation: dict = field(default_factory=dict)
    seconds: float = 0.0


def train_run(run: Run, setup: Setup, stream: torch.Tensor, held_out: torch.Tensor) -> Run:
    """Train one model with the shared protocol and measure it on the held-out windows along the way."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny matrices: one thread per training, trainings side by side
    start = time.perf_counter()
    torch.manual_seed(run.seed)
    if run.random_init:
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(run.folder))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(run.folder, dtype=torch.float32)
    masks = load_masks(run.folder).attach(model) if run.masks else None
    per_step = flops_per_token(model, setup.seq) * setup.batch * setup.seq
    if run.copies:
        run.separation_start = measure_separation(model, run.copies)
    opt, sched = training.adamw(model, run.lr, run.steps, run.warmup)
    marks = {round(run.steps * k / setup.evals) for k in range(setup.evals)} | {round(run.steps * f) for f in FRACTIONS}
    model.train()
    for step, ids in enumerate(batches(stream, setup, run.steps)):
        if step in marks:
            run.curve.append([step, step * per_step, training.loss(model, held_out)])
        training.step(model, opt, sched, ids)
        if masks:
            masks.step()
    if masks:
        if not masks.done:
            raise RuntimeError(f"{run.name}: the MSG masks had not reached alpha = 1 by the end of training")
        masks.detach()
    run.curve.append([run.steps, run.steps * per_step, training.loss(model, held_out)])
    if run.copies:
        run.separation = measure_separation(model, run.copies)
    if run.save_to:
        model.save_pretrained(run.save_to)
    run.seconds = time.perf_counter() - start
    return run


def run_cached(run: Run, setup: Setup, data: dict, work: Path) -> Run:
    """A training run, reused from work/runs when the same run was made before (same protocol and start)."""
    key = json.dumps([asdict(setup), run.name, run.folder, run.steps, run.lr, run.warmup, run.random_init,
                      run.seed, run.options, run.basis, sorted(run.copies)], sort_keys=True)
    cache = work / "runs" / f"{run.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"
    if cache.is_file() and not run.save_to:
        return Run(**{**asdict(run), **json.loads(cache.read_text())})
    stream = data["source" if run.name == "source" else "growth"]
    done = train_run(run, setup, stream, data["held_out"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({k: getattr(done, k) for k in ("curve", "separation_start", "separation", "seconds")}))
    print(f"  {run.name}: {run.curve[0][2]:.3f} -> {done.curve[-1][2]:.3f} in {done.seconds:.0f} s", file=sys.stderr)
    return done


# ---- report ------------------------------------------------------------------------------------------

def loss_at(curve, fraction: float) -> float:
    step = round(curve[-1][0] * fraction)
    return min(curve, key=lambda p: abs(p[0] - step))[2]


def flops_to_reach(curve, loss: float) -> float | None:
    """Training FLOPs at which a curve first reaches `loss` (linear between measurements); None: never."""
    if curve[0][2] <= loss:
        return 0.0
    for (_, f0, l0), (_, f1, l1) in zip(curve, curve[1:]):
        if l1 <= loss:
            return f0 + (f1 - f0) * (l0 - loss) / (l0 - l1)
    return None


def loss_at_flops(curve, flops: float) -> float | None:
    for (_, f0, l0), (_, f1, l1) in zip(curve, curve[1:]):
        if f0 <= flops <= f1:
            return l0 + (l1 - l0) * (flops - f0) / max(f1 - f0, 1e-9)
    return None


def summarize(results: dict[str, Run], chosen: list[Path_], source_flops: float) -> list[dict]:
    rows = []
    cont = results["continued_source"].curve
    for p in chosen:
        grown, twin = results[p.name].curve, results[p.twin].curve
        reach = flops_to_reach(grown, twin[-1][2])
        rows.append({
            "path": p.name, "label": p.label, "twin": p.twin,
            "loss": [loss_at(grown, f) for f in FRACTIONS],
            "scratch_loss": [loss_at(twin, f) for f in FRACTIONS],
            "continued_source_same_flops": loss_at_flops(cont, grown[-1][1]),
            "flops_to_scratch_final": reach, "scratch_flops": twin[-1][1],
            "saving": twin[-1][1] / reach if reach else None,  # None at step 0 (unbounded) or never
            "saving_with_source": twin[-1][1] / (reach + source_flops) if reach is not None else None,
            "separation_start": results[p.name].separation_start, "separation": results[p.name].separation,
        })
    return rows


def markdown(rows: list[dict]) -> str:
    pct = " / ".join(f"{round(f * 100)}" for f in FRACTIONS)
    lines = [f"| path | held-out loss at {pct} % of training | scratch, same shape | source trained on, same FLOPs "
             "| FLOPs to scratch's final loss | saving | incl. source training | copies' separation (start -> end) |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        reach = {None: "not reached", 0.0: "at step 0"}.get(r["flops_to_scratch_final"])
        reach = reach or f"{r['flops_to_scratch_final']:.3g} of {r['scratch_flops']:.3g}"
        saving = "unbounded" if r["flops_to_scratch_final"] == 0.0 else "-" if r["saving"] is None else f"{r['saving']:.2f}x"
        with_src = f"{r['saving_with_source']:.2f}x" if r["saving_with_source"] else "-"
        sep = "; ".join(f"{k}: {r['separation_start'][k]:.2g} -> {v:.2g}" for k, v in r["separation"].items()) or "-"
        cont = "-" if r["continued_source_same_flops"] is None else f"{r['continued_source_same_flops']:.3f}"
        lines.append(f"| {r['label']} | {' / '.join(f'{x:.3f}' for x in r['loss'])} | {r['scratch_loss'][-1]:.3f} "
                     f"| {cont} | {reach} | {saving} | {with_src} | {sep} |")
    return "\n".join(lines)


def plot(results: dict[str, Run], chosen: list[Path_], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [p for p in chosen if p.plotted]
    panels = [("width (HyperCloning, LEMON, MSG)", [p for p in chosen if not p.name.startswith(("moe", "stack"))]),
              ("depth (G_stack) and experts (MoE)", [p for p in chosen if p.name.startswith(("moe", "stack"))])]
    panels = [x for x in panels if x[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.2), sharey=True, squeeze=False)
    for ax, (what, ps) in zip(axes[0], panels):
        colors = {}
        for p in ps:
            c = results[p.name].curve
            line, = ax.plot([x[1] for x in c], [x[2] for x in c], lw=1.8, label=p.label)
            if p.twin not in colors:
                colors[p.twin] = line.get_color()
                t = results[p.twin].curve
                ax.plot([x[1] for x in t], [x[2] for x in t], ls="--", lw=1.2, color=colors[p.twin],
                        label=f"scratch ({p.twin.removeprefix('scratch_')} shape)")
        cont = results["continued_source"].curve
        ax.plot([x[1] for x in cont], [x[2] for x in cont], color="black", ls=":", lw=1.5, label="source, trained on")
        ax.set_title(what, fontsize=10)
        ax.set_xlabel("training FLOPs after growth")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out loss (nats / token)")
    fig.suptitle(textwrap.fill(title, 160), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)


# ---- main --------------------------------------------------------------------------------------------

def step_flops(folder: Path, setup: Setup) -> float:
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(folder)))
    return flops_per_token(model, setup.seq) * setup.batch * setup.seq


def make_source(work: Path, setup: Setup, data: dict) -> Run:
    """The trained source (cached in work/source with its tokenizer)."""
    import transformers

    folder = work / "source"
    run = Run("source", str(folder), setup.source_steps, setup.source_lr, setup.source_steps // 10,
              random_init=True, seed=0)
    info = folder / "source_run.json"
    if info.is_file() and (folder / "model.safetensors").is_file():
        return Run(**{**asdict(run), **json.loads(info.read_text())})
    training.llama_config(setup, transformers.AutoTokenizer.from_pretrained(str(folder))).save_pretrained(str(folder))
    run.save_to = str(folder)
    print(f"training the source ({setup.source_steps} steps)", file=sys.stderr)
    done = train_run(run, setup, data["source"], data["held_out"])
    info.write_text(json.dumps({"curve": done.curve, "seconds": done.seconds}))
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(".cache/growth_evidence"), help="models and cached runs")
    ap.add_argument("--out", type=Path, help="write OUT.json, OUT.png and OUT.md")
    ap.add_argument("--quick", action="store_true", help="a few-minute run for exploring settings")
    ap.add_argument("--paths", help="comma-separated subset of: " + ", ".join(p.name for p in paths(Setup(), None)))
    ap.add_argument("--steps", type=int, help="training steps after growth")
    ap.add_argument("--source-steps", type=int)
    ap.add_argument("--lr", type=float, help="peak learning rate after growth (every model)")
    ap.add_argument("--warmup", type=int, help="warmup steps after growth (every model)")
    ap.add_argument("--snr", type=float, help="split level for HyperCloning and LEMON (default: grow's default)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    overrides = dict(QUICK) if args.quick else {}
    for key in ("steps", "source_steps", "lr", "warmup"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    setup = Setup(**overrides)
    work = args.work / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    torch.set_num_threads(1)

    data = prepare_data(work, setup)
    print(f"text: {data['source'].numel():,} tokens for the source, {data['growth'].numel():,} after growth, "
          f"{data['held_out'].numel():,} held out", file=sys.stderr)
    source = make_source(work, setup, data)
    source_flops, source_loss = source.curve[-1][1], source.curve[-1][2]
    chosen = paths(setup, args.snr)
    if args.paths:
        wanted = args.paths.split(",")
        chosen = [p for p in chosen if p.name in wanted]
    src = work / "source"
    runs, twins, records = [], {}, {}
    for p in chosen:
        folder = work / "grown" / p.name
        fn = grow.expand if p.operation == "expand" else grow.upcycle
        fn(src, folder, force=True, **p.options)
        records[p.name] = json.loads((folder / "grow.json").read_text())
        runs.append(Run(p.name, str(folder), setup.steps, p.lr or setup.lr, setup.warmup, masks=p.masks,
                        options=p.options, copies=copy_structure(p, setup)))
        if p.twin not in twins:
            twins[p.twin] = Run(p.twin, str(folder), setup.steps, setup.lr, setup.warmup, random_init=True)
    runs += twins.values()
    basis = hashlib.sha1((src / "model.safetensors").read_bytes() + inspect.getsource(batches).encode()).hexdigest()
    most = max(step_flops(Path(r.folder), setup) for r in runs) * setup.steps
    runs.append(Run("continued_source", str(src), math.ceil(most / step_flops(src, setup)), setup.lr,
                    setup.warmup, copies={}))
    for r in runs:
        r.basis = basis
    runs.sort(key=lambda r: -r.steps * step_flops(Path(r.folder), setup))
    with ProcessPoolExecutor(args.jobs) as pool:
        done = list(pool.map(run_cached, runs, [setup] * len(runs), [data] * len(runs), [work] * len(runs)))
    results = {r.name: r for r in done}

    rows = summarize(results, chosen, source_flops)
    title = (f"Llama {setup.hidden}/{setup.ffn}/{setup.layers} layers trained {setup.source_steps} steps "
             f"(held-out loss {source_loss:.3f}, {source_flops:.3g} FLOPs); every model then trains {setup.steps} "
             f"steps of {setup.batch}x{setup.seq} tokens, AdamW lr {setup.lr:g}, {setup.warmup} warmup steps + cosine")
    table = markdown(rows)
    print(f"\n{title}\n\n{table}\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({
            "setup": asdict(setup), "source": {"loss": source_loss, "flops": source_flops, "curve": source.curve},
            "rows": rows, "plans": {k: {"exact": v["exact"], "options": v["options"], "stats": v.get("stats", {})}
                                    for k, v in records.items()},
            "runs": {k: asdict(v) for k, v in results.items()}}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(f"{title}\n\n{table}\n")
        plot(results, chosen, args.out.with_suffix(".png"), title)
    print(f"({time.time() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
