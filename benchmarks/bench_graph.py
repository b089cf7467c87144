"""Circuit-graph benchmark on a Llama-3-8B-shaped graph (no weights needed).

32 layers, 32 query heads, 8 KV heads, d_model 4096, random scores. Times (median of 3 runs):
graph build, top-n and greedy selection (n = 1000, 10000, each followed by pruning), JSON export
and load in the own and the EAP-IG/MIB schema.

Run: `python benchmarks/bench_graph.py [--runs 3] [--layouts grouped per_query_head]`
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from circuits import layout as layout_module
from circuits.export import from_eap_json
from circuits.graph import Graph

LLAMA3_8B = SimpleNamespace(n_layers=32, n_heads=32, n_key_value_heads=8, d_model=4096,
                            parallel_attn_mlp=False, model_name="llama-3-8b-shaped")
TARGETS = {"build": 1.0, "topn": 2.0, "greedy": 2.0, "export": 5.0}


def median_time(fn, runs: int) -> tuple[float, float]:
    """Median wall-clock and median CPU (process) seconds: on a shared machine the CPU time is
    the load-independent figure (it can exceed wall time with several torch threads)."""
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def report(label: str, seconds: tuple[float, float], target: float | None) -> None:
    wall, cpu = seconds
    verdict = "" if target is None else f"  target < {target:.0f} s  {'ok' if wall < target else 'MISSED'}"
    print(f"  {label:<30} wall {wall:7.3f} s  cpu {cpu:7.3f} s{verdict}")


def build(kv: str) -> Graph:
    layout_module._cached.cache_clear()  # time the layout (valid mask, slot map) too, not a cache hit
    g = Graph.from_model(LLAMA3_8B, kv_edges=kv)
    g.slot_nodes, g.input_slots  # computed lazily on first use: count them in the build
    return g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layouts", nargs="+", default=["grouped", "per_query_head"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.runs} runs")
    for kv in args.layouts:
        g = build(kv)
        print(f"\n{kv}: n_forward={g.n_forward}, n_backward={g.n_backward}, valid edges={g.n_valid_edges:,}")
        report("build (Graph.from_model)", median_time(lambda: build(kv), args.runs), TARGETS["build"])
        g.scores = torch.randn(g.n_forward, g.n_backward, generator=torch.Generator().manual_seed(0))
        for n in (1000, 10000):
            report(f"top-n n={n} + prune", median_time(lambda: g.apply_topn(n), args.runs), TARGETS["topn"])
            print(f"    -> {g.n_edges_in_graph} edges after pruning")
        for n in (1000, 10000):
            report(f"greedy n={n} + prune", median_time(lambda: g.apply_greedy(n), args.runs), TARGETS["greedy"])
            print(f"    -> {g.n_edges_in_graph} edges after pruning")
        with tempfile.TemporaryDirectory() as tmp:
            own, eap = Path(tmp) / "own.json", Path(tmp) / "eap.json"
            report("own JSON export", median_time(lambda: g.save(own), args.runs), TARGETS["export"])
            report("own JSON load", median_time(lambda: Graph.load(own), args.runs), None)
            report("EAP-IG JSON export", median_time(lambda: g.save(eap, format="eap-json"), args.runs),
                   TARGETS["export"])
            report("EAP-IG JSON load", median_time(lambda: from_eap_json(eap), args.runs), None)
            print(f"    file sizes: own {own.stat().st_size / 1e6:.1f} MB, EAP-IG {eap.stat().st_size / 1e6:.1f} MB")
            assert Graph.load(own).equals(g), "own JSON round trip is not exact"


if __name__ == "__main__":
    main()
