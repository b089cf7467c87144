"""GIM per rule: held-out faithfulness of EAP / EAP-IG-inputs circuits and EAP-IG's completeness.

For each task, scoring method and GIM setting (off, all rules, each rule alone, all rules but
the norm freeze, all but the q/k/v scales): score the edges on the discovery prompts (`make(task, model, n=16, seed=0)`),
take the top 1% and 5% of edges by |score| (pruned), and evaluate them by exact edge patching on
held-out prompts (`n=32, seed=1`): normalised faithfulness with a percentile-bootstrap 95%
interval over the held-out prompts (`bench_faithfulness.normalised`, 1000 resamples). For
EAP-IG-inputs also its completeness on the discovery prompts: the sum of the scores of every edge
out of `input` divided by the mean metric change corrupted - clean (1 = complete; IG's 5 points
make it approximate even without GIM).

    PYTHONPATH=. python benchmarks/bench_gim_rules.py --threads 1 [--tasks ioi greater_than]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_faithfulness import interval, normalised  # noqa: E402

from circuits import attribute, evaluate  # noqa: E402
from circuits.graph import Graph  # noqa: E402
from circuits.tasks import make  # noqa: E402
from gimlens.gim import GIMConfig  # noqa: E402

OFF = GIMConfig.off()
#: label -> GIM config (None: off)
SETTINGS = {
    "off": None,
    "all rules": GIMConfig(),
    "freeze_norm only": OFF.with_overrides(freeze_norm=True),
    "softmax_temperature only": OFF.with_overrides(softmax_temperature=2.0),
    "q/k/v scales only": OFF.with_overrides(q_scale=0.25, k_scale=0.25, v_scale=0.5),
    "gate/up scales only": OFF.with_overrides(gate_scale=0.5, up_scale=0.5),
    "all but freeze_norm": GIMConfig().with_overrides(freeze_norm=False),
    "all but q/k/v scales": GIMConfig().with_overrides(q_scale=None, k_scale=None, v_scale=None),
}


def rows(model, task_name: str, args):
    train = make(task_name, model, n=args.n, seed=0)
    held = make(task_name, model, n=args.n_eval, seed=1)
    graph = Graph.from_model(model)
    N, bs = graph.n_valid_edges, args.batch_size
    sizes = [max(1, int(p / 100 * N)) for p in args.percents]
    clean = evaluate(model, graph.copy().reset(empty=False), held, batch_size=bs)
    base = evaluate(model, graph.copy().reset(empty=True), held, batch_size=bs)
    t_clean = float(evaluate(model, graph.copy().reset(empty=False), train, batch_size=bs).mean())
    t_base = float(evaluate(model, graph.copy().reset(empty=True), train, batch_size=bs).mean())
    gen = torch.Generator().manual_seed(1)
    resamples = torch.cat([torch.arange(len(clean))[None],
                           torch.randint(len(clean), (args.bootstrap, len(clean)), generator=gen)])
    print(f"{task_name}: {N} edges; held-out clean {float(clean.mean()):.3f}, corrupted "
          f"{float(base.mean()):.3f}; discovery clean {t_clean:.3f}, corrupted {t_base:.3f}", flush=True)
    for method in args.methods:
        for label in args.settings:
            gim = SETTINGS[label]
            t0 = time.process_time()
            scored = attribute(model, Graph.from_model(model), train, method=method, gim=gim,
                               ig_steps=args.ig_steps, batch_size=bs)
            cpu = time.process_time() - t0
            metrics, kept = [], []
            for n in sizes:
                circuit = scored.copy().apply_topn(n, absolute=True)
                metrics.append(evaluate(model, circuit, held, batch_size=bs))
                kept.append(circuit.n_edges_in_graph)
            f = normalised(torch.stack(metrics), clean, base, resamples)  # [R, sizes]
            complete = None
            if method == "EAP-IG-inputs":
                complete = float(scored.scores[0][scored.valid[0]].sum()) / (t_base - t_clean)
            row = dict(task=task_name, method=method, rules=label, f=f, kept=kept, complete=complete, cpu=cpu)
            print("  " + line(row, args.percents), flush=True)
            yield row


def line(row: dict, percents) -> str:
    cells = [f"{interval(row['f'][:, i])} ({k})"
             for i, k in enumerate(row["kept"])]
    complete = "" if row["complete"] is None else f"{row['complete']:.3f}"
    return " | ".join([row["task"], row["method"], row["rules"], *cells, complete, f"{row['cpu']:.0f}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["ioi", "greater_than"])
    parser.add_argument("--methods", nargs="+", default=["EAP", "EAP-IG-inputs"])
    parser.add_argument("--percents", nargs="+", type=float, default=[1.0, 5.0])
    parser.add_argument("--n", type=int, default=16, help="discovery prompts (seed 0)")
    parser.add_argument("--n-eval", type=int, default=32, help="held-out prompts (seed 1)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--model", default="smollm2", help="smollm2 or tiny-<gpt2|llama|qwen2>")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from bench_faithfulness import load

    model = load(args.model)
    head = ["task", "method", "GIM rules", *[f"{p:g}% of edges" for p in args.percents],
            "completeness", "scoring CPU s"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    out = [line(r, args.percents) for task in args.tasks for r in rows(model, task, args)]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    print("\n".join(f"| {r} |" for r in out))


if __name__ == "__main__":
    main()
