"""Layer-wise IG benchmark: time per layer and completeness error against the number of steps.

Models: the tiny 2-layer, 64-wide GPT-2 (``tiny_model("gpt2", d_model=64, n_layers=2)``) at
T = 8 and T = 33 tokens, where LIG 0.1.0 took 1.05 / 3.9 s (``layer``) and 18.3 / 26.7 s
(``att``) per layer; and, unless ``--no-smollm2``, the embedded SmolLM2-135M-Instruct on a
~20-token prompt. Times are medians over runs and layers, 32 Gauss-Legendre steps, the input-token
baseline (LIG's default). Completeness: max over layers and targets of
``|sum_i IG_{i→j} - ||ΔΦ_j||| / ||ΔΦ_j||`` (targets with ``||ΔΦ_j|| > 1e-4``).

Run: ``python benchmarks/bench_layerwise.py [--runs 3] [--threads N] [--no-tiny] [--no-smollm2]
[--smollm2-layers 3 20]``
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from gimlens.layerwise import layerwise_ig
from gimlens.testing import tiny_model

TEXT = ("When Mary and John went to the store, John gave a drink to Mary. Then Alice and Bob went "
        "to the park, and Bob gave a ball to Alice. After Tom and Anna went to the school, Anna gave "
        "a book to Tom.")
SMOL_TEXT = "When Mary and John went to the store after school on Friday, John gave a cold drink to"
LIG = {("layer", 8): 1.05, ("layer", 33): 3.9, ("att", 8): 18.3, ("att", 33): 26.7}


def tokens_of_length(model, n: int) -> torch.Tensor:
    toks = model.to_tokens(TEXT)
    assert toks.shape[1] >= n, f"prompt has only {toks.shape[1]} tokens"
    return toks[:, :n]


def time_per_layer(model, tokens, layers, granularity: str, runs: int, **kw) -> float:
    layerwise_ig(model, tokens, layers=layers[0], granularity=granularity, **kw)  # warm-up
    times = []
    for _ in range(runs):
        for l in layers:
            start = time.perf_counter()
            layerwise_ig(model, tokens, layers=l, granularity=granularity, **kw)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def worst_relative_error(model, tokens, layers, granularity: str, **kw) -> float:
    res = layerwise_ig(model, tokens, layers=layers, granularity=granularity, **kw)
    worst = 0.0
    for f in res.flows.values():
        big = f.total > 1e-4
        if big.any():
            worst = max(worst, float((f.completeness_error.abs()[big] / f.total[big]).max()))
    return worst


def convergence_table(model, tokens, layers, label: str) -> None:
    print(f"\n{label}: completeness error (max relative) vs steps")
    print(f"  {'granularity':<8} {'baseline':<12} " + " ".join(f"{s:>9}" for s in (16, 32, 64)))
    for g in ("layer", "att", "mlp"):
        for b in ("input_token", "zero"):
            errs = [worst_relative_error(model, tokens, layers, g, baseline=b, steps=s) for s in (16, 32, 64)]
            print(f"  {g:<8} {b:<12} " + " ".join(f"{e:9.1e}" for e in errs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--no-tiny", action="store_true")
    parser.add_argument("--smollm2-layers", type=int, nargs="+", default=[3, 20])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 is the fair choice on a shared, busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 32 Gauss-Legendre steps, "
          f"input-token baseline; median of {args.runs} runs per layer")

    if not args.no_tiny:
        bench_tiny(args.runs)
    if not args.no_smollm2:
        bench_smollm2(args.runs, args.smollm2_layers)


def bench_tiny(runs: int) -> None:
    model = tiny_model("gpt2", d_model=64, n_layers=2)
    print("\ntiny GPT-2 (2 layers, d_model 64, 4 heads): seconds per layer")
    print(f"  {'granularity':<12} {'T':>3} {'gimlens':>9} {'LIG 0.1.0':>10} {'speed-up':>9}")
    for g in ("layer", "att", "mlp"):
        for T in (8, 33):
            t = time_per_layer(model, tokens_of_length(model, T), [0, 1], g, runs)
            lig = LIG.get((g, T))
            extra = f"{lig:10.2f} {lig / t:8.0f}x" if lig else f"{'':>10} {'':>9}"
            print(f"  {g:<12} {T:>3} {t:9.3f} {extra}")
    t = time_per_layer(model, tokens_of_length(model, 33), [0, 1], "att", runs, gim=True)
    print(f"  {'att + GIM':<12} {33:>3} {t:9.3f}")
    convergence_table(model, tokens_of_length(model, 33), [0, 1], "tiny GPT-2, T=33")


def bench_smollm2(runs: int, layers: list[int]) -> None:
    from gimlens.models import load_model

    start = time.perf_counter()
    smol = load_model()
    print(f"\nSmolLM2-135M-Instruct loaded in {time.perf_counter() - start:.1f} s")
    toks = smol.to_tokens(SMOL_TEXT)
    print(f"SmolLM2, T={toks.shape[1]}, layers {layers}: seconds per layer")
    for g in ("layer", "att", "mlp"):
        t = time_per_layer(smol, toks, layers, g, max(1, runs - 2))
        print(f"  {g:<12} {t:9.2f}")
    convergence_table(smol, toks, layers, f"SmolLM2, T={toks.shape[1]}")


if __name__ == "__main__":
    main()
