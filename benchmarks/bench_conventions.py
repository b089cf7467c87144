"""gimlens' default EAP-IG conventions against the previous ones, and MIB's metrics of each method.

The evidence for issue 11's closing note, on IOI (`circuits.tasks.make("ioi", ...)`) with the
embedded SmolLM2-135M-Instruct (`gimlens.load_model()`; `--tiny` for a tiny random Llama). One
task of `n_discover + n_eval` prompts is split: the first `n_discover` score edges, the other
`n_eval` (disjoint) evaluate circuits. All graphs use `kv_edges="per_query_head"` (MIB's layout).

1. **Scores, default vs previous convention**, on the discovery prompts:
   - `EAP-IG-inputs`, EAP-IG's rule (`quadrature="riemann_left"`, `alpha = k/m`, `k = 0..m-1`,
     the default) vs the previous right sum (`quadrature="riemann_right"`, `k = 1..m`), `m = steps`;
     with the identity right = left + 2 (EAP - clean-corrupted) / m as a check;
   - `EAP-IG-activations`, EAP-IG's per-node runs (the default) vs `activations="joint"`, with
     `act_steps` points on the first `n_act` discovery prompts (per-node costs `(2L + 1) act_steps`
     forward and backward passes per batch).

   Printed: relative difference `||default - previous||_F / ||default||_F`, Pearson correlation
   over the valid edges, and how many of the top-100 edges by `|score|` change.
2. **MIB's metrics** (`circuits.mib.mib_metrics` rules: CPR from the signed selection, CMD from the
   absolute one, the mean faithfulness of each) of `EAP`, `EAP-IG-inputs` and `EAP-IG-activations`
   (defaults), each with and without GIM (`gim=True`), on the held-out prompts. The per-example
   metric of every circuit comes from `circuits.evaluate`, so the script also gives bootstrap 95%
   intervals over held-out examples (`--boot` resamples; the circuits are held fixed, so the
   interval covers the choice of evaluation prompts only). The point values are checked against
   `mib_metrics` itself for the first graph (`--no-check` skips that).
3. **Time** (wall and process CPU, one run each) of every attribution.
4. `--only nodes`: **MLP node scores under both rules** (`attribute(level="node")` with
   `mlp_gradient="output"`, the default, and `"input"`, EAP-IG's `attribute_node`) against the
   exact effect of ablating each MLP node alone (`circuits.evaluate(level="node")` with that node
   out, minus the full circuit), on the discovery prompts the scores are computed on: Pearson and
   Spearman correlation over the `L` MLP nodes and `sum |score - exact| / sum |exact|`.

Sizes of the recorded SmolLM2 run (docs/performance.md), chosen to finish in half an hour on 2 CPU
cores shared with other jobs: 8 discovery prompts, 16 held-out, `steps = 5` for EAP-IG-inputs;
`act_steps = 2` on 2 prompts for EAP-IG-activations (122 passes per batch, about 11 minutes wall
there); 1000 bootstrap resamples; the two halves as two processes, one torch thread each:

    python benchmarks/bench_conventions.py --only inputs --n-discover 8 --n-eval 16 --threads 1
    python benchmarks/bench_conventions.py --only activations --n-discover 8 --n-act 2 --n-eval 16 --threads 1

rerun later on a quieter machine with 32 held-out prompts and EAP-IG-activations on 8 (±GIM, about 6.5 CPU-minutes
each): `--only inputs --n-discover 8 --n-eval 32` and `--only activations --n-discover 8 --n-act 8 --n-eval 32`.
Part 4:

    python benchmarks/bench_conventions.py --only nodes --n-discover 16 --threads 1

Run: `python benchmarks/bench_conventions.py [--tiny] [--n-discover 16] [--n-eval 32] [--steps 5]
[--act-steps 2] [--n-act 8] [--boot 1000] [--threads N] [--no-check] [--only inputs|activations|nodes]`
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import scipy.stats  # a test dependency (pip install -e ".[test]")
import torch

from circuits.attribute import attribute
from circuits.evaluate import evaluate
from circuits.graph import Graph, KVEdges
from circuits.mib import curve_areas, mib_metrics, mib_points, MIB_FRACTIONS
from circuits.tasks import make


def timed(fn):
    """`(result, wall seconds, CPU seconds of this process)`."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def compare(default: Graph, previous: Graph, top: int = 100) -> dict:
    """Relative difference, correlation and top-`top` changes of two score matrices."""
    valid = default.valid
    a, b = default.scores[valid].double(), previous.scores[valid].double()
    rel = float((a - b).norm() / a.norm())
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    top_a = set(a.abs().topk(top).indices.tolist())
    top_b = set(b.abs().topk(top).indices.tolist())
    return {"rel": rel, "corr": corr, "changed": top - len(top_a & top_b)}


def node_rules(model, task, steps: int) -> None:
    """Part 4: MLP node scores of both `mlp_gradient` rules against exact single-node ablation."""
    layout = Graph.from_model(model)
    L = model.cfg.n_layers
    rows = [layout.forward_index(l) for l in range(L)]
    (full, wall, cpu) = timed(lambda: evaluate(model, layout.copy(), task, level="node"))
    exact = []
    for row in rows:
        g = layout.copy()
        keep = torch.ones(g.n_forward, dtype=torch.bool)
        keep[row] = False
        g.nodes_in_graph = keep
        exact.append(float((evaluate(model, g, task, level="node") - full).mean()))
    exact = torch.tensor(exact, dtype=torch.float64)
    print(f"## 4. MLP node scores vs exact single-node ablation ({len(task)} prompts, {L} MLP nodes; "
          f"one evaluation {wall:.1f} s wall, {cpu:.1f} s CPU)\n")
    print(f"exact effects: mean |effect| {float(exact.abs().mean()):.4f}, largest "
          f"{float(exact.abs().max()):.4f} (MLP {int(exact.abs().argmax())})\n")
    print("| method | mlp_gradient | Pearson | Spearman | sum abs error / sum abs effect |")
    print("|---|---|---|---|---|")
    for method, kw in (("EAP", {}), ("EAP-IG-inputs", {"steps": steps})):
        for rule in ("output", "input"):
            g = attribute(model, layout.copy(), task, method=method, level="node", mlp_gradient=rule, **kw)
            s = g.node_scores[rows].double()
            pearson = float(torch.corrcoef(torch.stack([s, exact]))[0, 1])
            spearman = float(scipy.stats.spearmanr(s.numpy(), exact.numpy()).statistic)  # ties: average ranks
            err = float((s - exact).abs().sum() / exact.abs().sum())
            print(f"| {method} | {rule} | {pearson:.3f} | {spearman:.3f} | {err:.3f} |", flush=True)


class MIBRuns:
    """MIB's two selections per graph, with per-example metrics of every circuit (cached)."""

    def __init__(self, model, task, layout: Graph):
        self.model, self.task = model, task
        self.grouped = layout.as_kv_edges(KVEdges.GROUPED)
        self.values: dict[bytes, torch.Tensor] = {}
        self.clean = self.metric_of(self.grouped.valid.clone())
        self.empty = self.metric_of(torch.zeros_like(self.grouped.valid))

    def metric_of(self, mask: torch.Tensor) -> torch.Tensor:
        key = mask.cpu().numpy().tobytes()
        if key not in self.values:
            patched = self.grouped.reset(empty=True)
            patched.in_graph = mask
            self.values[key] = evaluate(self.model, patched, self.task).double()
        return self.values[key]

    def curves(self, graph: Graph) -> dict[bool, torch.Tensor]:
        """`{absolute: [n_points, n_eval]}` per-example metrics (MIB's point rule, top-n, prune)."""
        per_query = graph.as_kv_edges(KVEdges.PER_QUERY_HEAD)
        importance = per_query.copy()
        importance.scores = -per_query.scores  # MIB's sign: positive = ablation lowers the metric
        out = {}
        for absolute in (False, True):
            rows = []
            for n in mib_points(per_query.n_valid_edges, MIB_FRACTIONS):
                circuit = importance.copy()
                circuit.apply_topn(n, absolute)
                rows.append(self.metric_of(circuit.as_kv_edges(KVEdges.GROUPED).in_graph))
            out[absolute] = torch.stack(rows)
        return out

    def summary(self, rows: torch.Tensor, idx: torch.Tensor | None = None) -> tuple[float, float, float]:
        """(area under, area from 1, mean) of one curve on the examples `idx` (all if None)."""
        pick = (lambda v: v.mean()) if idx is None else (lambda v: v[idx].mean())
        clean, empty = pick(self.clean), pick(self.empty)
        f = [float((pick(r) - empty) / (clean - empty)) for r in rows]
        return curve_areas(MIB_FRACTIONS, f)


def interval(values: list[float]) -> str:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return "[n/a]"
    lo, hi = finite[int(0.025 * (len(finite) - 1))], finite[int(0.975 * (len(finite) - 1))]
    return f"[{lo:.3f}, {hi:.3f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random Llama instead of SmolLM2")
    p.add_argument("--n-discover", type=int, default=16)
    p.add_argument("--n-eval", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="EAP-IG-inputs points")
    p.add_argument("--act-steps", type=int, default=2, help="EAP-IG-activations points per node group")
    p.add_argument("--n-act", type=int, default=8, help="discovery prompts for EAP-IG-activations")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-check", action="store_true", help="skip the check against mib_metrics")
    p.add_argument("--only", choices=("inputs", "activations", "nodes"), default=None,
                   help="only EAP / EAP-IG-inputs (with GIM), only the EAP-IG-activations runs, or "
                        "only part 4 (MLP node rules)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.tiny:
        from gimlens.testing import tiny_model

        model, name = tiny_model("llama", n_layers=4, d_model=64), "tiny llama (4 layers, random)"
    else:
        from gimlens import load_model

        model, name = load_model(), "SmolLM2-135M-Instruct"
    task = make("ioi", model, n=args.n_discover + args.n_eval, seed=args.seed)
    discover = task.subset(slice(0, args.n_discover))
    held_out = task.subset(slice(args.n_discover, None))
    act_task = discover.subset(slice(0, min(args.n_act, args.n_discover)))
    shared = {tuple(r) for r in discover.clean.tolist()} & {tuple(r) for r in held_out.clean.tolist()}
    layout = Graph.from_model(model, kv_edges="per_query_head")
    groups = 2 * model.cfg.n_layers + 1
    print(f"# {name}, IOI seed {args.seed}: {len(discover)} discovery prompts, {len(held_out)} held-out "
          f"({len(shared)} clean prompts in both), {layout.n_valid_edges} edges (per query head), "
          f"torch threads {torch.get_num_threads()}")
    if args.only in (None, "inputs"):
        print(f"EAP and EAP-IG-inputs on {len(discover)} prompts, EAP-IG-inputs with {args.steps} points")
    if args.only in (None, "activations"):
        print(f"EAP-IG-activations: {args.act_steps} points per node group on {len(act_task)} prompts "
              f"({groups} x {args.act_steps} = {groups * args.act_steps} passes per batch)")
    print()
    if args.only == "nodes":
        node_rules(model, discover, args.steps)
        return 0

    runs = {  # label -> (task, attribute keywords), in the order they run
        "EAP": (discover, {}),
        "clean-corrupted": (discover, {"method": "clean-corrupted"}),
        "EAP-IG-inputs": (discover, {"method": "EAP-IG-inputs", "steps": args.steps}),
        "EAP-IG-inputs, riemann_right": (discover, {"method": "EAP-IG-inputs", "steps": args.steps,
                                                    "quadrature": "riemann_right"}),
        "EAP + GIM": (discover, {"gim": True}),
        "EAP-IG-inputs + GIM": (discover, {"method": "EAP-IG-inputs", "steps": args.steps, "gim": True}),
        "EAP-IG-activations": (act_task, {"method": "EAP-IG-activations", "steps": args.act_steps}),
        "EAP-IG-activations, joint": (act_task, {"method": "EAP-IG-activations", "steps": args.act_steps,
                                                 "activations": "joint"}),
        "EAP-IG-activations + GIM": (act_task, {"method": "EAP-IG-activations", "steps": args.act_steps,
                                                "gim": True}),
    }
    if args.only:  # the EAP-IG-activations runs, or all the others
        runs = {k: v for k, v in runs.items()
                if k.startswith("EAP-IG-activations") == (args.only == "activations")}
    graphs, times = {}, {}

    def score(label):
        t, kw = runs[label]
        graphs[label], wall, cpu = timed(lambda: attribute(model, layout.copy(), t, **kw))
        times[label] = (wall, cpu, len(t))
        print(f"  scored {label} on {len(t)} prompts: wall {wall:.1f} s, CPU {cpu:.1f} s", flush=True)

    def versus(method, prev, what_default, what_prev):
        for label in (method, prev):
            if label not in graphs:
                score(label)
        c = compare(graphs[method], graphs[prev])
        print(f"\n| method | default | previous | relative difference | correlation | top-100 edges changed |")
        print("|---|---|---|---|---|---|")
        print(f"| {method} | {what_default} | {what_prev} | {c['rel']:.3f} | {c['corr']:.3f} | "
              f"{c['changed']} |", flush=True)

    print("## 1. Default vs previous convention (discovery prompts)\n")
    if args.only != "activations":
        versus("EAP-IG-inputs", "EAP-IG-inputs, riemann_right", "riemann_left (k = 0..m-1)",
               "riemann_right (k = 1..m)")
        score("EAP")
        score("clean-corrupted")
        left, right = graphs["EAP-IG-inputs"].scores, graphs["EAP-IG-inputs, riemann_right"].scores
        identity = left + 2 * (graphs["EAP"].scores - graphs["clean-corrupted"].scores) / args.steps
        print(f"\nCheck: max |right - (left + 2 (EAP - clean-corrupted) / m)| = "
              f"{float((right - identity).abs().max()):.2e} (max |right| {float(right.abs().max()):.2e})")
    if args.only != "inputs":
        versus("EAP-IG-activations", "EAP-IG-activations, joint", "per-node runs", "joint")
    for label in ("EAP", "EAP-IG-inputs", "EAP-IG-activations"):
        if label in graphs:
            comp = graphs[label].completeness
            print(f"Completeness {label}: input edges {comp.input_edges:.4f}, metric change "
                  f"{comp.metric_change:.4f}, relative error {comp.relative_error:.3f}")


    print("\n## 2. MIB metrics on the held-out prompts\n", flush=True)
    mib = MIBRuns(model, held_out, layout)
    print(f"m_clean {float(mib.clean.mean()):.4f}, m_corrupt (empty circuit) {float(mib.empty.mean()):.4f}; "
          f"points {mib_points(layout.n_valid_edges, MIB_FRACTIONS)}")
    gen = torch.Generator().manual_seed(args.seed)
    boots = [torch.randint(len(held_out), (len(held_out),), generator=gen) for _ in range(args.boot)]
    ci_note = f", bootstrap 95% over {args.boot} resamples of held-out examples" if boots else ""
    print(f"CPR (signed selection, higher is better), CMD (absolute selection, lower is better), mean "
          f"faithfulness of each run{ci_note}; then the faithfulness at the fractions "
          + ", ".join(f"{x:g}" for x in MIB_FRACTIONS) + "\n")
    print("| method | CPR | CMD | mean f (signed) | mean f (absolute) |")
    print("|---|---|---|---|---|", flush=True)
    mib_labels = [k for k in ("EAP", "EAP + GIM", "EAP-IG-inputs", "EAP-IG-inputs + GIM", "EAP-IG-activations",
                              "EAP-IG-activations + GIM") if k in runs]
    points, lines = {}, []
    for label in mib_labels:
        if label not in graphs:
            score(label)
        (curve, wall, _) = timed(lambda: mib.curves(graphs[label]))
        signed, absolute = mib.summary(curve[False]), mib.summary(curve[True])
        points[label] = (signed[0], absolute[1], signed[2], absolute[2])  # CPR, CMD, mean s, mean a
        cis = []
        if boots:
            b = [(mib.summary(curve[False], i), mib.summary(curve[True], i)) for i in boots]
            cis = [interval([s[0] for s, _ in b]), interval([a[1] for _, a in b]),
                   interval([s[2] for s, _ in b]), interval([a[2] for _, a in b])]
        cells = [f"{v:.3f}" + (f" {cis[k]}" if cis else "") for k, v in enumerate(points[label])]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        clean, empty = mib.clean.mean(), mib.empty.mean()
        for absolute in (False, True):
            f = [float((r.mean() - empty) / (clean - empty)) for r in curve[absolute]]
            lines.append(f"- {label}, {'absolute' if absolute else 'signed'} ({wall:.0f} s for both): "
                         + " ".join(f"{v:.3f}" for v in f))
    print("\n" + "\n".join(lines))
    if not args.no_check and mib_labels:
        label = mib_labels[0]
        ref = mib_metrics(model, graphs[label], held_out)
        want = (ref.cpr, ref.cmd, ref.signed.mean, ref.absolute.mean)
        diff = max(abs(g - w) for g, w in zip(points[label], want))
        print(f"\nCheck against circuits.mib.mib_metrics ({label}): max |difference| {diff:.1e}")
        assert diff < 1e-4, (points[label], want)
    print("\n## 3. Time per attribution (one run each)\n")
    print("| attribution | prompts | wall s | CPU s |")
    print("|---|---|---|---|")
    for label, (wall, cpu, n) in times.items():
        print(f"| {label} | {n} | {wall:.1f} | {cpu:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
