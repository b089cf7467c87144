"""Why no method finds a small induction circuit in SmolLM2: a diagnosis, per corruption of the task.

For each `--corruptions` value of `circuits.tasks.induction` (the default `second_half`, and
`first_half`, `last_token`: what differs between the clean and the corrupted prompt), on
`--n` discovery and `--n-eval` held-out prompts (disjoint, one seed):

1. the model on the task: mean clean and corrupted metric (logit difference, held out);
2. induction heads: each head's mean attention from the scored (last) position to the token after
   the earlier occurrence of the query token (the classic induction score, clean discovery
   prompts), the top `--top` heads;
3. exact head ablation (node-level patching, `circuits.evaluate(level="node")`): the share of the
   clean-minus-corrupted effect lost when the top 1 / 3 / `--top` induction heads carry their
   corrupted output (everything else clean), and the faithfulness of the node circuit made of the
   input, those heads, and every MLP (no other head);
4. where the attribution puts its mass: the share of EAP-IG-inputs' |scores| on edges out of the
   input node and on edges into the top induction heads;
5. (`--how-many 5 20 50`) how large a circuit the task needs: the top shares of edges and of
   nodes by EAP-IG-inputs scores, held out;
6. edge circuits, held out: each `--methods` at `--percents` of the edges (scores on the discovery
   prompts, top n), and optionally (`--edge-pruning`) one edge-pruning curve over the same sizes.

    PYTHONPATH=. python benchmarks/bench_induction.py --model smollm2 --threads 1 --out induction.md

Bootstrap 95% intervals over the held-out prompts (`--bootstrap` resamples, shared by every row).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_faithfulness import interval, load, normalised  # noqa: E402

from circuits import Graph, attribute, discover, evaluate, faithfulness_curve  # noqa: E402
from circuits.tasks import induction  # noqa: E402
from gimlens.runtime import atomic_write  # noqa: E402


def induction_scores(model, task, length: int) -> torch.Tensor:
    """`[layers, heads]` mean attention from the last position (the query `x(k-1)` of the repeat)
    to the token after its earlier occurrence: `xk`, at `offset + length - 1` (`offset` 1 with a
    BOS, else 0)."""
    offset = task.clean.shape[1] - (2 * length - 1)
    target = offset + length - 1
    rows = []
    with torch.no_grad():
        _, cache = model.run_with_cache(task.clean, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [b, heads, q, k]
        rows.append(pattern[:, :, -1, target].mean(0))
    return torch.stack(rows).float()


def node_circuit(graph: Graph, heads: list[tuple[int, int]], *, keep_others: bool) -> Graph:
    """Every node but `heads` (`keep_others`), or only the input, the MLPs and `heads`."""
    g = graph.copy().reset(empty=not keep_others)
    nodes = g.nodes_in_graph.clone()
    if not keep_others:
        nodes[g.forward_index(None)] = True
        for layer in range(g.cfg["n_layers"]):
            nodes[g.forward_index(layer)] = True
    for layer, head in heads:
        nodes[g.forward_index(layer, head)] = keep_others is False
    g.nodes_in_graph = nodes
    return g


def attribution_mass(scores: Graph, heads: list[tuple[int, int]]) -> tuple[float, float]:
    """Shares of |scores| on edges out of the input node and into `heads` (q, k, v)."""
    a = scores.scores.abs() * scores.valid
    total = float(a.sum())
    into = torch.zeros_like(scores.valid)
    for layer, head in heads:
        for qkv in ("q", "k", "v"):  # k/v by KV head on a grouped graph
            into[:, scores.backward_index(layer, head if qkv == "q" else scores.kv_slot(head), qkv)] = True
    return float(a[scores.forward_index(None)].sum()) / total, float((a * into).sum()) / total


def how_many(model, train, held, bs, args) -> list[str]:
    """How large a circuit the task needs: held-out faithfulness of the top `--how-many` percent
    of edges, and of nodes (`level="node"`), by EAP-IG-inputs scores of the discovery prompts."""
    scored = attribute(model, Graph.from_model(model), train, method="EAP-IG-inputs", level="node",
                       batch_size=bs)
    edges = faithfulness_curve(model, scored, held, sizes=args.how_many, batch_size=bs)
    nodes = faithfulness_curve(model, scored, held, sizes=args.how_many, batch_size=bs, level="node")
    return ["How large a circuit it needs (EAP-IG-inputs scores, top share, held out):", "",
            "| share | " + " | ".join(f"{p:g}%" for p in args.how_many) + " |",
            "|---" * (len(args.how_many) + 1) + "|",
            "| of edges | " + " | ".join(f"{v:.3f} ({n})" for v, n in zip(edges.faithfulness, edges.n_edges)) + " |",
            "| of nodes (heads, MLPs) | " + " | ".join(f"{v:.3f}" for v in nodes.faithfulness) + " |"]


def run(model, corruption: str, args, resamples) -> list[str]:
    task = induction(model, n=args.n + args.n_eval, seed=args.seed, length=args.length,
                     corruption=corruption)
    train, held = task.subset(slice(0, args.n)), task.subset(slice(args.n, args.n + args.n_eval))
    graph = Graph.from_model(model)
    bs = args.batch_size
    clean = evaluate(model, graph.copy().reset(empty=False), held, batch_size=bs)
    base = evaluate(model, graph.copy().reset(empty=True), held, batch_size=bs)
    f = lambda m: normalised(m, clean, base, resamples)  # noqa: E731
    lines = [f"### corruption `{corruption}`", "",
             f"Held out: clean metric {float(clean.mean()):.2f}, corrupted {float(base.mean()):.2f} "
             f"(gap {float(clean.mean() - base.mean()):.2f}); {graph.n_valid_edges} edges.", ""]

    score = induction_scores(model, train, args.length)
    flat = score.flatten().argsort(descending=True)
    ranked = [(int(i) // score.shape[1], int(i) % score.shape[1]) for i in flat[:args.top]]
    lines.append("Top induction heads (mean attention to the token to copy): "
                 + ", ".join(f"a{l}.h{h} {float(score[l, h]):.2f}" for l, h in ranked) + ".")
    lines += ["", "| heads (by induction score) | effect lost when they alone are corrupted | "
              "faithfulness of input + MLPs + those heads only |", "|---|---|---|"]
    for m in sorted({1, 3, args.top}):
        heads = ranked[:m]
        lost = 1 - f(evaluate(model, node_circuit(graph, heads, keep_others=True), held, batch_size=bs,
                              level="node"))
        only = f(evaluate(model, node_circuit(graph, heads, keep_others=False), held, batch_size=bs,
                          level="node"))
        lines.append(f"| top {m} | {interval(lost)} | {interval(only)} |")
    alone = f(evaluate(model, node_circuit(graph, [], keep_others=False), held, batch_size=bs, level="node"))
    lines += [f"| none (input + MLPs only) | — | {interval(alone)} |", ""]

    lines += ["| method | " + " | ".join(f"{p:g}% of edges" for p in args.percents)
              + " | discovery f | input-edge share of abs. scores | share into the top heads | CPU s |",
              "|---" * (len(args.percents) + 5) + "|"]
    if args.how_many:
        lines += how_many(model, train, held, bs, args) + [""]
    sizes = [max(1, int(p / 100 * graph.n_valid_edges)) for p in args.percents]
    train_clean = float(evaluate(model, graph.copy().reset(empty=False), train, batch_size=bs).mean())
    train_base = float(evaluate(model, graph.copy().reset(empty=True), train, batch_size=bs).mean())
    methods = [(m, m.endswith("+GIM")) for m in args.methods] + (
        [("edge-pruning", False)] if args.edge_pruning else [])
    for label, gim in methods:
        method = label.removesuffix("+GIM")
        t0 = time.process_time()
        if method == "edge-pruning":
            found = discover(model, Graph.from_model(model), train, n_edges=sizes, method=method,
                             batch_size=bs, progress=args.progress)
            circuits, shares = [found[n] for n in sizes], ("—", "—")
        else:
            scored = attribute(model, Graph.from_model(model), train, method=method, gim=gim or None,
                               batch_size=bs)
            circuits = [scored.copy().apply_topn(n, absolute=True) for n in sizes]
            shares = tuple(f"{v:.2f}" for v in attribution_mass(scored, ranked))
        cpu = time.process_time() - t0
        held_f = [interval(f(evaluate(model, c, held, batch_size=bs))) + f" ({c.n_edges_in_graph})"
                  for c in circuits]
        on_train = [(float(evaluate(model, c, train, batch_size=bs).mean()) - train_base)
                    / (train_clean - train_base) for c in circuits]
        lines.append(f"| {label} | " + " | ".join(held_f) + " | "
                     + " / ".join(f"{v:.2f}" for v in on_train) + f" | {shares[0]} | {shares[1]} | {cpu:.0f} |")
        print(lines[-1], flush=True)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--corruptions", nargs="+", default=["second_half", "first_half", "last_token"])
    parser.add_argument("--methods", nargs="*", default=["EAP", "EAP+GIM", "EAP-IG-inputs"])
    parser.add_argument("--edge-pruning", action="store_true", help="also one edge-pruning curve per corruption")
    parser.add_argument("--percents", type=float, nargs="+", default=[1, 5])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--n-eval", type=int, default=64)
    parser.add_argument("--length", type=int, default=10)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--how-many", type=float, nargs="*", default=[],
                        help="also the faithfulness of the top share (percent) of edges and of nodes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="A forward hook edited")
    model = load(args.model)
    gen = torch.Generator().manual_seed(args.seed + 1)
    resamples = torch.cat([torch.arange(args.n_eval)[None],
                           torch.randint(args.n_eval, (args.bootstrap, args.n_eval), generator=gen)])
    lines = [f"{args.model}, induction (length {args.length}), discovery {args.n} / held out {args.n_eval} "
             f"prompts (seed {args.seed}), batch {args.batch_size}. Cells: normalised faithfulness "
             f"[bootstrap 95% interval] (edges after pruning).", ""]
    for corruption in args.corruptions:
        lines += run(model, corruption, args, resamples)
        atomic_write(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
