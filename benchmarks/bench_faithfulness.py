"""Faithfulness of IOI circuits on SmolLM2-135M-Instruct: EAP vs EAP-IG-inputs, each with and without GIM.

One IOI task of ``n + n_eval`` prompts (seed ``--seed``) is split: the first ``n`` prompts are used
for attribution, the remaining ``n_eval`` (held out) for evaluation. For each method the edges are
scored once, then circuits of the top 100, 200, 500, 1000, 2000 edges (by |score|, dangling edges
pruned) are evaluated by exact edge patching (corrupted ablation) with
``circuits.faithfulness_curve``: normalised faithfulness ``(m - m_corrupted) / (m_clean -
m_corrupted)`` of the mean logit difference. CPR (area under the curve) and CMD (area between the
curve and 1) are the curve's areas (trapezoid rule) over the fraction-of-edges axis, on these edge
counts (0.14, 0.28, 0.71, 1.4, 2.8 % of SmolLM2's 70651 edges, in place of the default grid's 0.1,
0.2, 0.5, 1, 2 %) followed by the default grid's 5, 10, 20, 50, 100 %: ten circuits per method.

Cost: every circuit is one patched forward over the evaluation prompts; EAP costs one corrupted
forward and one forward-and-backward per prompt, EAP-IG-inputs one corrupted forward and
``ig_steps`` forward-and-backward passes. On 2 CPU cores SmolLM2 runs at roughly 0.3 s per prompt
and forward, so the defaults (64 attribution prompts, 32 held-out) take about 20 minutes on an
idle machine; ``--n 200`` (the size the plan asked for) takes about 45.

Run: ``python benchmarks/bench_faithfulness.py --out faithfulness.md [--n 64 --n-eval 32]``
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from circuits.attribute import attribute
from circuits.evaluate import DEFAULT_SIZES, faithfulness_curve
from circuits.graph import Graph
from circuits.tasks import ioi
from gimlens.models import load_model

METHODS = {  # label -> (method, gim)
    "EAP": ("EAP", False),
    "EAP-IG-inputs": ("EAP-IG-inputs", False),
    "EAP + GIM": ("EAP", True),
    "EAP-IG-inputs + GIM": ("EAP-IG-inputs", True),
}


def clean_and_corrupted(model, task, batch_size: int) -> tuple[float, float, float]:
    """Mean clean / corrupted logit difference and clean accuracy (metric > 0)."""
    clean, corrupted = [], []
    with torch.no_grad():
        for s in task.batches(batch_size):
            mask = None if task.attention_mask is None else task.attention_mask[s]
            clean.append(task.metric(model(task.clean[s], attention_mask=mask), s))
            corrupted.append(task.metric(model(task.corrupted[s], attention_mask=mask), s))
    c, x = torch.cat(clean), torch.cat(corrupted)
    return float(c.mean()), float(x.mean()), float((c > 0).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="attribution prompts")
    parser.add_argument("--n-eval", type=int, default=32, help="held-out evaluation prompts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--edges", type=int, nargs="+", default=[100, 200, 500, 1000, 2000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, required=True, help="markdown file for the table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="A forward hook edited")

    start = time.perf_counter()
    model = load_model()
    task = ioi(model, n=args.n + args.n_eval, seed=args.seed)
    train, held_out = task.subset(slice(0, args.n)), task.subset(slice(args.n, None))
    graph = Graph.from_model(model)
    clean_m, corrupted_m, accuracy = clean_and_corrupted(model, held_out, args.batch_size)
    print(f"model loaded, {graph.n_valid_edges} edges; held-out logit diff clean {clean_m:.3f} "
          f"(accuracy {accuracy:.2f}), corrupted {corrupted_m:.3f}  [{time.perf_counter() - start:.0f} s]",
          flush=True)
    edge_sizes = [100.0 * e / graph.n_valid_edges for e in args.edges]
    sizes = sorted(set(edge_sizes) | {s for s in DEFAULT_SIZES if s > max(edge_sizes)})

    rows = []
    for label in args.methods:
        method, gim = METHODS[label]
        t0 = time.perf_counter()
        attribute(model, graph, train, method=method, gim=gim or None, ig_steps=args.ig_steps,
                  batch_size=args.batch_size)
        t1 = time.perf_counter()
        curve = faithfulness_curve(model, graph, held_out, sizes=sizes, batch_size=args.batch_size)
        t2 = time.perf_counter()
        at = {s: (f, k) for s, f, k in zip(curve.sizes, curve.faithfulness, curve.n_edges)}
        cells = [at[s] for s in edge_sizes]
        rows.append((label, cells, curve.cpr, curve.cmd, t1 - t0, t2 - t1))
        print(f"{label}: " + ", ".join(f"{e}: {f:.3f} ({k})" for e, (f, k) in zip(args.edges, cells))
              + f"; CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f}; attribution {t1 - t0:.0f} s, "
              f"evaluation {t2 - t1:.0f} s", flush=True)

    total = time.perf_counter() - start
    lines = [
        f"IOI on SmolLM2-135M-Instruct ({graph.n_valid_edges} edges, grouped k/v): attribution on "
        f"{args.n} prompts, evaluation on {args.n_eval} held-out prompts (corrupted = ABC names), "
        f"batch {args.batch_size}, {args.ig_steps} IG steps, {args.threads} CPU threads; held-out "
        f"logit diff clean {clean_m:.2f} (accuracy {accuracy:.2f}), corrupted {corrupted_m:.2f}. "
        "Cells: normalised faithfulness (edges left after pruning). CPR / CMD over "
        f"{len(sizes)} circuit sizes (these edge counts, then {', '.join(f'{s:g}' for s in sizes[len(edge_sizes):])} % "
        f"of edges). Total {total / 60:.1f} min.",
        "",
        "| method | " + " | ".join(f"{e} edges" for e in args.edges) + " | CPR ↑ | CMD ↓ | attribution s |",
        "|---" * (len(args.edges) + 4) + "|",
    ]
    for label, cells, cpr, cmd, t_attr, _ in rows:
        lines.append(f"| {label} | " + " | ".join(f"{f:.3f} ({k})" for f, k in cells)
                     + f" | {cpr:.3f} | {cmd:.3f} | {t_attr:.0f} |")
    table = "\n".join(lines) + "\n"
    args.out.write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
