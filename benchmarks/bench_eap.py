"""Edge attribution speed against the floor of the plain model (closing-note figures).

Model: the embedded SmolLM2-135M-Instruct (``gimlens.models.load_model()``; ``--tiny`` for a
tiny random Llama), batch of 16 IOI prompts from ``circuits.tasks``. Median over ``--runs``
interleaved runs (after a warm-up) of:

- floor (EAP) = one no-grad forward of the corrupted batch + one forward-and-backward of the
  clean batch (the metric's gradient w.r.t. a leaf at ``hook_embed``, parameters frozen);
- ``circuits.attribute`` EAP for the batch (all edge scores);
- floor (IG, ``steps``) = the corrupted forward + ``steps`` forward-and-backward passes;
- EAP-IG-inputs with ``steps`` points (EAP-IG's rule ``alpha = k/steps``, ``k = 0..steps-1``,
  which costs one clean no-grad forward more than the floor counts); EAP with GIM (defaults);
  evaluate of one circuit;
- peak resident memory of the process (``resource.getrusage``).

Wall and process CPU times are both printed: on a shared machine the CPU time (with
``--threads 1``) is the steadier measure.

Parameters are frozen for the floor and for ``attribute`` alike (one extra line times EAP with
parameters that require grad, as a freshly loaded bridge has them).

Run: ``python benchmarks/bench_eap.py [--runs 5] [--batch 16] [--steps 5] [--threads 1] [--tiny]``
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import warnings

import torch

from circuits.attribute import attribute
from circuits.evaluate import evaluate
from circuits.graph import Graph
from circuits.tasks import make


def floor(model, task, steps: int) -> None:
    """The plain model's work: one corrupted no-grad forward and ``steps`` clean fwd+bwd."""
    mask = task.attention_mask
    with torch.no_grad():
        model(task.corrupted, attention_mask=mask)
    for _ in range(steps):
        leaf = {}

        def embed(x, hook):
            leaf["x"] = x.detach().requires_grad_()
            return leaf["x"]

        logits = model.run_with_hooks(task.clean, attention_mask=mask, fwd_hooks=[("hook_embed", embed)])
        torch.autograd.grad(task.metric(logits).sum(), leaf["x"])


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="tiny random Llama instead of SmolLM2")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    if args.tiny:
        from gimlens.testing import tiny_model

        model, name = tiny_model("llama", n_layers=4, d_model=64), "tiny llama"
    else:
        from gimlens.models import load_model

        model, name = load_model(), "SmolLM2-135M-Instruct"
    task = make("ioi", model, n=args.batch, seed=0)
    graph = Graph.from_model(model)
    print(f"{name}: {model.cfg.n_layers} layers, {model.cfg.n_heads} heads "
          f"({graph.cfg['n_kv_heads']} KV), batch {tuple(task.clean.shape)}, "
          f"{graph.n_valid_edges} edges, torch threads {torch.get_num_threads()}")

    circuit = graph.copy()
    circuit.in_graph = graph.valid & (torch.rand(graph.valid.shape) < 0.1)
    jobs = {
        "floor EAP (1 fwd + 1 fwd/bwd)": lambda: floor(model, task, 1),
        "EAP": lambda: attribute(model, graph, task),
        f"floor IG (1 fwd + {args.steps} fwd/bwd)": lambda: floor(model, task, args.steps),
        f"EAP-IG-inputs ({args.steps})": lambda: attribute(model, graph, task, method="EAP-IG-inputs",
                                                          steps=args.steps),
        "EAP + GIM": lambda: attribute(model, graph, task, gim=True),
        "evaluate (1 circuit)": lambda: evaluate(model, circuit, task),
    }
    flags = [p.requires_grad for p in model.parameters()]
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in jobs}
    try:
        for p_ in model.parameters():
            p_.requires_grad_(False)
        for fn in jobs.values():  # warm-up
            fn()
        for _ in range(args.runs):
            for key, fn in jobs.items():
                times[key].append(timed(fn))
    finally:
        for p_, f in zip(model.parameters(), flags):
            p_.requires_grad_(f)
    times["EAP, parameters requiring grad"] = [timed(lambda: attribute(model, graph, task))
                                               for _ in range(args.runs)]

    wall = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    print(f"{'median over runs':34s} {'wall':>8s} {'CPU':>8s}   CPU per run")
    for key in times:
        runs = ", ".join(f"{t[1]:.2f}" for t in times[key])
        print(f"{key:34s} {wall[key]:7.3f}s {cpu[key]:7.3f}s   ({runs})")
    keys = list(times)
    for label, num, den in (("EAP / floor", 1, 0), ("EAP-IG-inputs / IG floor", 3, 2),
                            ("EAP+GIM / floor", 4, 0)):
        print(f"ratio {label:26s} wall {wall[keys[num]] / wall[keys[den]]:.3f}   "
              f"CPU {cpu[keys[num]] / cpu[keys[den]]:.3f}   (target <= 1.25)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak RSS: {rss / (1024 if sys.platform != 'darwin' else 1024 ** 2):.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
