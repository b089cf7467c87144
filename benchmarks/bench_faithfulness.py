"""Faithfulness of discovered circuits on held-out examples: every `circuits.discover` method, with and without GIM.

Protocol (after MIB's circuit-localisation track; see `docs/performance.md` for the run shown there):

- tasks `circuits.tasks.make(name, model, n=n + n_eval, seed)` for each `--tasks` name; the first
  `--n` examples are the *discovery* set (every method sees only these), the last `--n-eval` the
  *evaluation* set (disjoint; nothing is tuned on it);
- for each method (`--methods`, scoring methods and the search methods `EAP-IG-iterative` and
  `edge-pruning`), with and without GIM (`--gim off on`; on: `discover(gim=True)`'s measured
  per-method rules, `circuits.gim_advice.gim_for`, e.g. every rule but the q/k/v scales for
  EAP-IG-inputs; `--gim every`: every rule), and each circuit size `--percents` (percent
  of the valid edges, `n_edges = int(pct / 100 * N)` as MIB counts): a circuit of at most `n_edges`
  edges is discovered (a scoring method scores once and takes the top n of each size; a search
  method runs once per size), then evaluated by exact edge patching (`circuits.evaluate`,
  corrupted ablation) on the evaluation set;
- normalised faithfulness `(mean m_circuit - mean m_corrupted) / (mean m_clean - mean m_corrupted)`
  per size; CPR (area under the curve) and CMD (area between the curve and 1) by the trapezoid
  rule over the fraction axis, divided by the axis' width (so both are mean values over the
  measured range), with `circuits.mib.curve_areas` (MIB's area rule), and MIB's mean over the
  points; MIB's own grid (0.1% .. 100%, signed selection for CPR) is `benchmarks/bench_conventions.py`;
- 95% intervals: percentile bootstrap over evaluation examples (`--bootstrap` resamples, one set
  of resamples shared by every method, so differences are paired);
- time: wall and CPU seconds of each discovery call, and its forward / backward pass count.

Writes a markdown table (`--out`) and a PNG of the curves (`--png`); `--save F.pt` also keeps the rows
(the bootstrap faithfulness of every size), and `--merge A.pt B.pt ...` builds one table and PNG
from runs made separately (for instance one process per method on a 2-core machine). Runs merge
only when their evaluation sets and resamples are the same (same `--seed`, `--n`, `--n-eval`,
`--bootstrap`); a (task, method) measured in several runs gets the union of their sizes, and its
CPR / CMD are computed over the sizes it has (the table says so where that range is narrower).
The "discovery f" column is the faithfulness of the same circuits on the discovery examples they
were found on (point estimates): its gap to the held-out value is the circuit's over-fit.

Run from the repository root with `PYTHONPATH=.` (else the script's folder comes first on the path and
an installed copy of `circuits` may be imported instead of the working tree's).

Run (tiny model, seconds): `python benchmarks/bench_faithfulness.py --model tiny-gpt2 --out /tmp/f.md`
Run (SmolLM2 IOI): `python benchmarks/bench_faithfulness.py --model smollm2 --tasks ioi --n 32
--n-eval 64 --out faithfulness.md --png faithfulness.png`
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from circuits import Graph, attribute, discover, evaluate
from circuits.gim_advice import gim_for
from circuits.mib import curve_areas
from circuits.tasks import make
from gimlens.gim import GIMConfig
from gimlens.runtime import atomic_write

#: `--gim` value -> (row label suffix, `gim=` argument): off, `discover(gim=True)`'s per-method
#: rules, every rule
GIM_SETTINGS = {"off": ("", None), "on": (" + GIM", True), "every": (" + GIM (every rule)", GIMConfig())}
SCORING = ("EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted")
SEARCH = ("EAP-IG-iterative", "edge-pruning")


def load(name: str):
    if name in ("smollm2", "gemma-3-270m"):
        from gimlens.models import load_model

        return load_model(None if name == "smollm2" else name)
    from gimlens.testing import tiny_model

    arch = name.removeprefix("tiny-")
    return tiny_model(arch, n_layers=4, d_model=64, n_heads=4, scale=2.0, seed=0)


def areas(percents: list[float], faith: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPR, CMD and the mean over points of curves `faith [..., len(percents)]`, by MIB's rules
    (`circuits.mib.curve_areas`: trapezoid areas on the linear fraction axis) over the measured
    grid. MIB's own grid spans 0.001..1 (width about 1); here the areas are divided by the grid's
    width so that CPR / CMD are mean values over the measured range and comparable between grids.
    """
    x = [p / 100 for p in percents]
    width = x[-1] - x[0] if len(x) > 1 else 1.0
    flat = faith.reshape(-1, faith.shape[-1])
    if len(x) < 2:
        cpr = flat[:, 0]
        return cpr.view(faith.shape[:-1]), (1 - cpr).abs().view(faith.shape[:-1]), cpr.view(faith.shape[:-1])
    out = torch.tensor([curve_areas(x, row.tolist()) for row in flat])
    cpr, cmd, mean = out[:, 0] / width, out[:, 1] / width, out[:, 2]
    return tuple(t.view(faith.shape[:-1]) for t in (cpr, cmd, mean))


def normalised(m: torch.Tensor, clean: torch.Tensor, base: torch.Tensor, resamples: torch.Tensor
               ) -> torch.Tensor:
    """Faithfulness of per-example metrics `m [..., n]` on each resample `[R, n]` -> `[R, ...]`
    (row 0 of `resamples` is the identity: the point estimate)."""
    mc, mb = clean[resamples].mean(-1), base[resamples].mean(-1)  # [R]
    mm = m[..., resamples].mean(-1)  # [..., R]
    return ((mm - mb) / (mc - mb)).movedim(-1, 0)


def passes(method: str, n_batches: int, args) -> str:
    """Forward (F) and forward-and-backward (FB) passes of one discovery call."""
    if method == "EAP":
        return f"{n_batches} F + {n_batches} FB"
    if method in ("EAP-IG-inputs", "EAP-IG-activations"):
        return f"{n_batches} F + {n_batches * args.ig_steps} FB"
    if method == "clean-corrupted":
        return f"{n_batches} F + {2 * n_batches} FB"
    if method == "EAP-IG-iterative":
        return f"{2 * n_batches} F + {n_batches * args.rounds * args.ig_steps} FB"
    if args.curve_steps:
        return f"{2 * n_batches} F + {args.curve_steps} FB (+ warm start) for the whole curve"
    return f"{2 * n_batches} F + {args.steps} FB (+ warm start)"


def run_task(model, task_name: str, args):
    """Yield one result row per method and GIM setting."""
    pool = args.pool or args.n  # the evaluation set is the last n_eval of pool + n_eval examples
    task = make(task_name, model, n=pool + args.n_eval, seed=args.seed)
    train, held = task.subset(slice(0, args.n)), task.subset(slice(pool, pool + args.n_eval))
    graph = Graph.from_model(model)
    N = graph.n_valid_edges
    sizes = [max(1, int(p / 100 * N)) for p in args.percents]
    bs = args.batch_size
    clean = evaluate(model, graph.copy().reset(empty=False), held, batch_size=bs)
    base = evaluate(model, graph.copy().reset(empty=True), held, batch_size=bs)
    train_clean = float(evaluate(model, graph.copy().reset(empty=False), train, batch_size=bs).mean())
    train_base = float(evaluate(model, graph.copy().reset(empty=True), train, batch_size=bs).mean())
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_eval = len(clean)
    resamples = torch.cat([torch.arange(n_eval)[None],
                           torch.randint(n_eval, (args.bootstrap, n_eval), generator=gen)])
    n_batches = -(-args.n // bs)
    print(f"{task_name}: {N} edges, discovery {args.n}, evaluation {n_eval} examples; clean "
          f"{float(clean.mean()):.3f}, corrupted {float(base.mean()):.3f}", flush=True)
    for method in args.methods:
        for gim in args.gim:
            suffix, gim_arg = GIM_SETTINGS[gim]
            label = method + suffix + (f" ({args.tag})" if args.tag else "")
            wall, cpu, metrics, kept, on_train = 0.0, 0.0, [], [], []
            scored, curve = None, None
            for n_edges in sizes:
                t0, c0 = time.perf_counter(), time.process_time()
                common = dict(gim=gim_arg, ig_steps=args.ig_steps, batch_size=bs)
                warm_gim = common["gim"] if args.warm_gim is None else args.warm_gim == "on" or None
                searched = dict(lr=args.lr, loss=args.loss, progress=args.progress)
                if method in SCORING:
                    if scored is None:  # "+ GIM": what discover(gim=True) uses for the method
                        scored = attribute(model, Graph.from_model(model), train, method=method,
                                           **dict(common, gim=gim_for(method, common["gim"])))
                    circuit = scored.copy().apply_topn(n_edges, absolute=True)
                elif method == "EAP-IG-iterative":
                    circuit = discover(model, Graph.from_model(model), train, n_edges=n_edges,
                                       method=method, rounds=args.rounds, **common)
                elif args.curve_steps:  # one search through every size (discover(n_edges=[...]))
                    if curve is None:
                        warm = warm_start(model, train, args, warm_gim, common)
                        curve = discover(model, Graph.from_model(model), train, n_edges=sizes,
                                         method=method, steps=args.curve_steps, warm_start=warm,
                                         **searched, **common)
                    circuit = curve[n_edges]
                else:
                    if scored is None:  # the warm start's scores, once
                        scored = warm_start(model, train, args, warm_gim, common)
                    circuit = discover(model, Graph.from_model(model), train, n_edges=n_edges,
                                       method=method, steps=args.steps, warm_start=scored,
                                       **searched, **common)
                wall += time.perf_counter() - t0
                cpu += time.process_time() - c0
                metrics.append(evaluate(model, circuit, held, batch_size=bs))
                kept.append(circuit.n_edges_in_graph)
                m_train = float(evaluate(model, circuit, train, batch_size=bs).mean())
                on_train.append((m_train - train_base) / (train_clean - train_base))
            f = normalised(torch.stack(metrics), clean, base, resamples)  # [R, sizes]
            yield dict(task=task_name, label=label, percents=list(args.percents), faith=f, kept=kept,
                       on_train=on_train, wall=wall, cpu=cpu, passes=passes(method, n_batches, args))
            cpr, cmd, _ = areas(args.percents, f)
            print(f"  {label}: " + ", ".join(f"{p}%: {float(v):.3f}" for p, v in zip(args.percents, f[0]))
                  + f"; CPR {float(cpr[0]):.3f}, CMD {float(cmd[0]):.3f}; {wall:.0f} s", flush=True)


def warm_start(model, train, args, gim, common) -> Graph | None:
    """Edge pruning's warm-start scores: `--warm-start` (`none`, a scoring method, or `mean`: the
    mean of the EAP and EAP-IG-inputs ranks) with `gim`, on the discovery set."""
    if args.warm_start == "none":
        return None
    options = dict(common, gim=gim)
    if args.warm_start != "mean":
        return attribute(model, Graph.from_model(model), train, method=args.warm_start, **options)
    ranks = []
    for method in ("EAP", "EAP-IG-inputs"):
        scores = attribute(model, Graph.from_model(model), train, method=method, **options).scores.abs()
        ranks.append(scores.flatten().argsort().argsort().float().view_as(scores))
    graph = Graph.from_model(model)
    graph.scores = torch.stack(ranks).mean(0).masked_fill(~graph.valid, 0.0)
    return graph


def interval(t: torch.Tensor) -> str:
    lo, hi = torch.quantile(t[1:], torch.tensor([0.025, 0.975])).tolist()
    return f"{float(t[0]):.3f} [{lo:.2f}, {hi:.2f}]"


def grid(rows: list[dict]) -> list[float]:
    return sorted({p for r in rows for p in r["percents"]})


def table(rows: list[dict], header: str) -> str:
    percents = grid(rows)
    lines = [header, "",
             "| task | method | " + " | ".join(f"{p:g}% of edges" for p in percents)
             + " | CPR ↑ | CMD ↓ | mean f | discovery f | discovery wall s (CPU s) | passes per size |",
             "|---" * (len(percents) + 8) + "|"]
    for r in rows:
        col = {p: i for i, p in enumerate(r["percents"])}
        cells = [interval(r["faith"][:, col[p]]) + f" ({r['kept'][col[p]]})" if p in col else "—"
                 for p in percents]
        cpr, cmd, mean = areas(r["percents"], r["faith"])
        span = "" if (r["percents"][0], r["percents"][-1]) == (percents[0], percents[-1]) else (
            f" ({r['percents'][0]:g}% only)" if len(r["percents"]) == 1
            else f" ({r['percents'][0]:g}–{r['percents'][-1]:g}%)")
        lines.append(f"| {r['task']} | {r['label']} | " + " | ".join(cells)
                     + f" | {interval(cpr)}{span} | {interval(cmd)}{span} | {interval(mean)}{span}"
                     + " | " + " / ".join(f"{v:.2f}" for v in r["on_train"])
                     + f" | {r['wall']:.0f} ({r['cpu']:.0f}) | {r['passes']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, name in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == name):
            f = r["faith"]
            lo, hi = torch.quantile(f[1:], torch.tensor([0.025, 0.975]), dim=0)
            (line,) = ax.plot(r["percents"], f[0], marker="o", label=r["label"])
            ax.fill_between(r["percents"], lo, hi, alpha=0.12, color=line.get_color())
        percents = grid([r for r in rows if r["task"] == name])
        ax.set_xscale("log")
        ax.set_xticks(percents, [f"{p:g}" for p in percents])
        ax.minorticks_off()
        ax.set_xlabel("% of edges")
        ax.set_ylabel("normalised faithfulness (held out)")
        ax.set_title(name)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(runs: list[dict]) -> tuple[list[dict], str]:
    """One list of rows from several saved runs (see the module docstring)."""
    keys = ("model", "seed", "pool", "n_eval", "bootstrap")
    for run in runs:  # runs saved before --pool: the evaluation set followed n
        run["meta"].setdefault("pool", run["meta"]["n"])
    first = runs[0]["meta"]
    for run in runs[1:]:
        bad = [k for k in keys if run["meta"][k] != first[k]]
        if bad:
            raise SystemExit(f"cannot merge runs that differ in {bad}: {first} vs {run['meta']}")
    merged: dict[tuple[str, str], dict] = {}
    for run in runs:
        for r in run["rows"]:
            key = (r["task"], r["label"])
            if key not in merged:
                merged[key] = dict(r, percents=[], faith=None, kept=[], on_train=[], wall=0.0, cpu=0.0)
            m = merged[key]
            cols = {p: (m["faith"][:, i], m["kept"][i], m["on_train"][i]) for i, p in enumerate(m["percents"])}
            cols.update({p: (r["faith"][:, i], r["kept"][i], r["on_train"][i]) for i, p in enumerate(r["percents"])})
            m["percents"] = sorted(cols)
            m["faith"] = torch.stack([cols[p][0] for p in m["percents"]], 1)
            m["kept"] = [cols[p][1] for p in m["percents"]]
            m["on_train"] = [cols[p][2] for p in m["percents"]]
            m["wall"] += r["wall"]
            m["cpu"] += r["cpu"]
    header = "\n\n".join(dict.fromkeys(run["meta"]["header"] for run in runs))
    tasks = list(dict.fromkeys(task for task, _ in merged))
    return sorted(merged.values(), key=lambda r: tasks.index(r["task"])), header


def write(rows: list[dict], header: str, args) -> None:
    atomic_write(args.out, table(rows, header))
    if args.png is not None:
        plot(rows, args.png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-gpt2", help="smollm2, gemma-3-270m, tiny-gpt2, tiny-llama or tiny-qwen2")
    parser.add_argument("--tasks", nargs="+", default=["ioi", "greater_than", "capitals", "induction"])
    parser.add_argument("--methods", nargs="+", default=["EAP", "EAP-IG-inputs", *SEARCH])
    parser.add_argument("--gim", nargs="+", default=["off", "on"], choices=list(GIM_SETTINGS),
                        help="on: discover(gim=True)'s measured per-method rules; every: every rule")
    parser.add_argument("--percents", type=float, nargs="+", default=[0.5, 1, 2, 5])
    parser.add_argument("--n", type=int, default=32, help="discovery examples")
    parser.add_argument("--n-eval", type=int, default=64, help="held-out evaluation examples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4, help="EAP-IG-iterative rounds")
    parser.add_argument("--steps", type=int, default=300, help="edge-pruning steps")
    parser.add_argument("--lr", type=float, default=0.1, help="edge-pruning learning rate")
    parser.add_argument("--curve-steps", type=int, default=None,
                        help="edge-pruning: ONE search of this many steps through every size (a curve)")
    parser.add_argument("--warm-start", default="EAP-IG-inputs",
                        choices=["none", "mean", "EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted"],
                        help="edge pruning's warm start (mean: the mean rank of EAP and EAP-IG-inputs)")
    parser.add_argument("--warm-gim", choices=["off", "on"], default=None,
                        help="GIM for the warm start only (default: the row's GIM setting)")
    parser.add_argument("--loss", choices=["metric", "kl"], default="metric", help="edge-pruning loss")
    parser.add_argument("--pool", type=int, default=None,
                        help="evaluate on examples pool..pool+n_eval (default pool = n): runs with "
                             "different --n then share one evaluation set")
    parser.add_argument("--tag", default="", help="appended to each row's label, e.g. the lever tried")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", type=Path, required=True, help="markdown table")
    parser.add_argument("--png", type=Path, default=None, help="PNG of the curves")
    parser.add_argument("--save", type=Path, default=None, help="keep the rows (torch.save) for --merge")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="build --out / --png from saved runs instead of running")
    args = parser.parse_args()
    if args.merge:
        rows, header = merge([torch.load(p, weights_only=False) for p in args.merge])
        write(rows, header, args)
        print(args.out.read_text())
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="A forward hook edited")

    start = time.perf_counter()
    model = load(args.model)
    rows = []
    for name in args.tasks:
        for row in run_task(model, name, args):
            rows.append(row)
            setup = (f"{args.model}: discovery {args.n} / evaluation {args.n_eval} examples per task "
                     f"(disjoint, seed {args.seed}), batch {args.batch_size}, {args.ig_steps} IG steps, "
                     f"iterative {args.rounds} rounds, edge pruning "
                     f"{f'one curve search of {args.curve_steps}' if args.curve_steps else args.steps} steps (lr {args.lr}, "
                     f"{args.loss} loss, warm start {args.warm_start}"
                     f"{'' if args.warm_gim is None else ' GIM ' + args.warm_gim}), {args.threads} "
                     f"threads. Cells: normalised faithfulness [bootstrap 95% interval, "
                     f"{args.bootstrap} resamples] (edges after pruning). CPR / CMD: MIB's trapezoid areas "
                     f"over the sizes measured divided by the range's width; mean f: MIB's mean over the "
                     f"points; discovery f: the same circuits on the discovery examples.")
            write(rows, f"{setup} Total {(time.perf_counter() - start) / 60:.1f} min.", args)
            if args.save is not None:  # the setup without the total, so merged tables list each once
                meta = dict(model=args.model, seed=args.seed, n=args.n, pool=args.pool or args.n,
                            n_eval=args.n_eval,
                            bootstrap=args.bootstrap, header=setup)
                atomic_write(args.save, lambda fh: torch.save(dict(meta=meta, rows=rows), fh))
    print("\n" + args.out.read_text())


if __name__ == "__main__":
    main()
