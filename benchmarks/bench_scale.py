"""Scaling benchmark: EAP on SmolLM2 IOI with 1 vs 2 processes (torchrun, gloo on CPU), and the
memory estimate of circuits._engine.memory against the measured peak.

    python benchmarks/bench_scale.py [--examples 32] [--batch-size 8] [--method EAP]

Each configuration runs in fresh processes; the time is the attribution call alone (model load
excluded), the peak is the growth of the process's maximum resident set over the warm-up and timed calls.
On a 2-core machine two processes share the same cores, so expect little gain.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def worker(args) -> None:
    import torch

    import circuits
    from circuits._engine.memory import estimate_memory
    from gimlens.distributed import init_from_env, is_main_process, world

    init_from_env()
    torch.set_num_threads(args.threads)
    from gimlens import load_model

    model = load_model()
    task = circuits.tasks.make("ioi", model, n=args.n, seed=0)
    graph = circuits.Graph.from_model(model)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # a high-water mark
    circuits.attribute(model, graph.copy(), task, method=args.method, batch_size=args.batch_size)  # warm-up
    start = time.perf_counter()
    circuits.attribute(model, graph, task, method=args.method, batch_size=args.batch_size)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    est = estimate_memory(model, graph, args.batch_size, task.clean.shape[1])
    if is_main_process():
        with open(args.out, "w") as f:
            json.dump({"processes": world()[1], "seconds": elapsed, "peak_growth": peak,
                       "estimate": est.total, "estimate_text": str(est)}, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", dest="n", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--method", default="EAP")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    common = [__file__, "--worker", "--examples", str(args.n), "--batch-size", str(args.batch_size),
              "--method", args.method, "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for procs in (1, 2):
        out = tempfile.mktemp(suffix=".json")
        launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                      "--nproc_per_node", str(procs)]
        subprocess.run([*launch, *common, "--out", out], check=True, env=env)
        with open(out) as f:
            rows.append(json.load(f))
        os.unlink(out)
    one = rows[0]["seconds"]
    print(f"\nEAP scaling on SmolLM2 IOI, n={args.n}, batch {args.batch_size}, method {args.method}")
    print("| processes | seconds | speed-up | peak growth (MiB) | estimate (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['processes']} | {r['seconds']:.2f} | {one / r['seconds']:.2f} | "
              f"{r['peak_growth'] / 2**20:.0f} | {r['estimate'] / 2**20:.0f} |")
    print(f"estimate breakdown (per rank, one batch): {rows[0]['estimate_text']}")


if __name__ == "__main__":
    main()
