"""The task set on a real model: each task's metric on its clean and its corrupted prompts.

For IOI, capitals, induction and greater-than (`circuits.tasks.make(name, model, n, seed=0)`) it
prints the mean of the task's own metric (logit difference; probability difference for
greater-than) on the clean prompts and on the corrupted ones, each with a 95 % bootstrap interval
over prompts (2,000 resamples), the share of clean prompts with a positive metric and the top-1
accuracy of the correct answer.

    python benchmarks/bench_tasks.py [--model gemma-3-270m] [--threads 1]

Cost: 2 x (64 + 3 x 48) forwards; on Gemma 3 270M about 10 minutes on one thread of a busy
2-core machine (its 262,144-token unembedding dominates), on SmolLM2 about 6.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings

import torch

TASKS = (("ioi", 64), ("capitals", 48), ("induction", 48), ("greater_than", 48))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="a load_model() name: the embedded SmolLM2 (default) or gemma-3-270m")
    parser.add_argument("--batch", type=int, default=16, help="prompts per forward")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    from circuits.tasks import make
    from gimlens.models import load_model

    start = time.perf_counter()
    model = load_model(args.model)
    print(f"{model.cfg.model_name}, {torch.get_num_threads()} threads, loaded in "
          f"{time.perf_counter() - start:.0f} s")
    print(f"\n{'task':>13} {'n':>3} {'clean [95% CI]':>24} {'corrupted [95% CI]':>26} {'>0':>6} {'top-1':>6}")
    for name, n in TASKS:
        task = make(name, model, n=n, seed=0)
        clean, top1 = _metric(model, task, task.clean, args.batch)
        corrupted, _ = _metric(model, task, task.corrupted, args.batch)
        print(f"{name:>13} {len(clean):3d} {_interval(clean):>24} {_interval(corrupted):>26} "
              f"{(clean > 0).float().mean():6.3f} {top1.float().mean():6.3f}")
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")


def _metric(model, task, tokens, batch):
    """The task's metric and top-1 on `tokens` (its clean or its corrupted prompts)."""
    run = dataclasses.replace(task, clean=tokens)
    out, top = [], []
    with torch.no_grad():
        for s in run.batches(batch):
            mask = None if run.attention_mask is None else run.attention_mask[s]
            logits = model(run.clean[s], attention_mask=mask)
            out.append(run.metric(logits, s))
            top.append(run.top1(logits, s))
    return torch.cat(out), torch.cat(top)


def _interval(x: torch.Tensor) -> str:
    g = torch.Generator().manual_seed(0)
    means = x[torch.randint(0, len(x), (2000, len(x)), generator=g)].mean(1)
    return f"{x.mean():.3f} [{means.quantile(0.025):.3f}, {means.quantile(0.975):.3f}]"


if __name__ == "__main__":
    main()
