"""Cost of a faithfulness curve from one edge-pruning search against single-size searches.

Counts model forward passes (a `hook_embed` counter) and CPU seconds of `discover(...,
method="edge-pruning")` at 1% of edges (300 steps) and of one curve over 0.5/1/2/5% (450 steps),
and the discovery-set faithfulness of each size both ways.

    PYTHONPATH=. python benchmarks/bench_curve.py --threads 1 --model tiny-llama
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_faithfulness import load  # noqa: E402

from circuits import discover, faithfulness  # noqa: E402
from circuits.graph import Graph  # noqa: E402
from circuits.tasks import make  # noqa: E402


def measured(model, fn):
    calls = []
    t0 = time.process_time()
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: calls.append(1))]):
        out = fn()
    return out, len(calls), time.process_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300, help="steps of a single-size search")
    parser.add_argument("--curve-steps", type=int, default=450)
    parser.add_argument("--percents", nargs="+", type=float, default=[0.5, 1, 2, 5])
    parser.add_argument("--single", nargs="+", type=float, default=[1.0],
                        help="percents at which a single-size search is also run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.model)
    task = make(args.task, model, n=args.n, seed=0)
    N = Graph.from_model(model).n_valid_edges
    size = {p: max(1, int(p / 100 * N)) for p in args.percents + args.single}
    common = dict(method="edge-pruning", batch_size=args.batch_size)
    curve, c_passes, c_cpu = measured(model, lambda: discover(
        model, Graph.from_model(model), task, n_edges=[size[p] for p in args.percents],
        steps=args.curve_steps, **common))
    print(f"{args.model} {args.task} n={args.n}: {N} edges")
    print(f"| search | passes | CPU s | " + " | ".join(f"{p:g}% ({size[p]})" for p in args.percents) + " |")
    print("|---|---|---|" + "---|" * len(args.percents))
    f = [faithfulness(model, curve[size[p]], task, batch_size=args.batch_size) for p in args.percents]
    print(f"| curve, {args.curve_steps} steps | {c_passes} | {c_cpu:.1f} | "
          + " | ".join(f"{v:.3f}" for v in f) + " |", flush=True)
    for p in args.single:
        g, passes, cpu = measured(model, lambda: discover(model, Graph.from_model(model), task,
                                                          n_edges=size[p], steps=args.steps, **common))
        v = faithfulness(model, g, task, batch_size=args.batch_size)
        cells = [f"{v:.3f}" if q == p else "" for q in args.percents]
        print(f"| single {p:g}%, {args.steps} steps | {passes} | {cpu:.1f} | " + " | ".join(cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
