"""Token attribution on long prompts: peak memory and time per method on SmolLM2, and the estimate of
`gimlens.memory` against the measured peak.

    python benchmarks/bench_memory.py [--lengths 100 500 1000] [--steps 4] [--max-memory 4GB] [--out memory.md]

Each (method, length) runs in a fresh process: load the model, a short warm-up call, then reset the
high-water mark of the resident set (`/proc/self/clear_refs`) and time one `gimlens.attribute` call
with `max_memory`. "Measured" is the growth of `VmHWM` over the resident set before the call;
"estimate" is the largest pass the call planned (`gimlens.memory.fit_rows`, recorded here). The
processes run with `MALLOC_MMAP_THRESHOLD_=65536` so that freed tensors leave the resident set
(glibc otherwise keeps some, and the growth would under-count a second pass).

To keep the run short on CPU, integrated gradients takes `--steps` (default 4) and feature
ablation varies the last `--ablate` (default 16) positions only (the others are already the
baseline token, so they need no forward); one pass of either holds exactly what it holds in a
full run, so the peak is that of the full run; the time is not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ("gim", "gradient_x_input", "integrated_gradients", "feature_ablation")


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def worker(spec: dict) -> dict:
    import gc

    import torch

    import gimlens
    import gimlens.attribution.methods as methods

    torch.set_num_threads(spec["threads"])
    model = gimlens.load_model()
    baseline = model.tokenizer.encode(" ", add_special_tokens=False)[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, int(model.cfg.d_vocab), (1, spec["pos"]), generator=g)
    kw: dict = {"method": spec["method"], "baseline": baseline, "max_memory": spec["max_memory"]}
    if spec["method"] == "integrated_gradients":
        kw["steps"] = spec["steps"]
    if spec["method"] == "feature_ablation":
        ids[0, : spec["pos"] - spec["ablate"]] = baseline
    plans = []
    planned = methods.fit_rows

    def record(*args, **kwargs):  # the benchmark's own window on the plans
        plan = planned(*args, **kwargs)
        plans.append(plan)
        return plan

    methods.fit_rows = record
    gimlens.attribute(model, ids[:, :8], **kw)  # warm-up
    plans.clear()
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    cpu, start = time.process_time(), time.perf_counter()
    gimlens.attribute(model, ids, **kw)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    best = max(plans, key=lambda p: p.total)
    return {**spec, "measured": _status("VmHWM") - before, "estimate": best.total,
            "rows": best.rows, "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ablate", type=int, default=16)
    parser.add_argument("--max-memory", default="4GB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's gimlens
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    lines = [
        f"max_memory {args.max_memory}; integrated_gradients {args.steps} steps; feature_ablation "
        f"varies the last {args.ablate} positions.", "",
        "| method | tokens | rows/pass | estimate | measured peak growth | estimate / measured | wall s | CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pos in args.lengths:
        for method in args.methods:
            spec = {"method": method, "pos": pos, "steps": args.steps, "ablate": args.ablate,
                    "max_memory": args.max_memory, "threads": args.threads}
            run = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                 capture_output=True, text=True)
            if run.returncode:
                line = f"| {method} | {pos} | failed: {run.stderr.strip().splitlines()[-1]} |"
            else:
                r = json.loads(run.stdout.strip().splitlines()[-1])
                mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
                line = (f"| {method} | {pos} | {r['rows']} | {mib(r['estimate'])} | {mib(r['measured'])} | "
                        f"{r['estimate'] / r['measured']:.2f} | {r['wall']:.1f} | {r['cpu']:.1f} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
