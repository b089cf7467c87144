"""Cost of one differentiable patched forward+backward (edge pruning's step) against a plain one.

On SmolLM2 and `circuits.tasks.make("ioi", model, n=--n)`: medians of `--repeats` runs, CPU
and wall seconds, of

- a plain forward + backward of the batch (the metric's gradient w.r.t. the parameters' inputs,
  no hooks);
- one patched forward + backward with float missing coefficients `w` requiring grad (one edge
  pruning step, `circuits._engine.masked.patched_metric`);
- one probe pass of `EAP-IG-iterative` (patched, gradient w.r.t. the probe);
- one whole `circuits.attribute(method="EAP")` call on the same examples.

It prints the ratios to the plain forward+backward. `--profile` adds a `torch.profiler` table
of the patched step's top operators.

Run from the repository root: `PYTHONPATH=. python benchmarks/bench_discover.py --threads 1`
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from circuits import Graph, attribute
from circuits._engine.masked import patched_metric
from circuits.run import Run
from circuits.tasks import make
from gimlens.runtime import prepared


def timed(fn, repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(cpus), statistics.median(walls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--skip-eap", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="A forward hook edited")
    from gimlens.models import load_model

    model = load_model()
    task = make("ioi", model, n=args.n)
    graph = Graph.from_model(model)
    with prepared(model):
        run = Run.build(model, graph, task, keep_sources=True)
        run.ablated(0)  # the corrupted forward, outside the timings
        batch = run.batches[0]
        emb = model.embed.W_E

        def plain():
            with torch.enable_grad():
                emb.requires_grad_(True)
                try:
                    values = run.examples.score(model(batch.tokens, attention_mask=batch.mask), batch.idx)
                    values.sum().backward()
                finally:
                    emb.requires_grad_(False)
                    emb.grad = None

        w0 = (graph.valid.float() * 0.5).to(run.spec.device)

        def patched():
            w = w0.clone().requires_grad_(True)
            with torch.enable_grad():
                patched_metric(run, 0, w)[0].sum().backward()

        def probe():
            from circuits.iterative import patched_scores

            patched_scores(run, graph.valid, 1)

        rows = [("plain forward+backward", plain), ("patched float step", patched),
                ("iterative probe pass", probe)]
        results = {name: timed(fn, args.repeats) for name, fn in rows}
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                patched()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if not args.skip_eap:
        results["attribute(EAP)"] = timed(
            lambda: attribute(model, Graph.from_model(model), task, method="EAP"), args.repeats)
    base = results["plain forward+backward"][0]
    print(f"SmolLM2, ioi n={args.n} (one batch, {tuple(batch.tokens.shape)} tokens), "
          f"{args.threads} thread(s), median of {args.repeats}")
    print("| run | CPU s | wall s | CPU / plain |\n|---|---|---|---|")
    for name, (cpu, wall) in results.items():
        print(f"| {name} | {cpu:.2f} | {wall:.2f} | {cpu / base:.1f}x |")


if __name__ == "__main__":
    main()
