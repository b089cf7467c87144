"""Cost of GIM over plain gradient × input: ``explain`` on SmolLM2, a batch of 16 prompts.

Times, interleaved in one process (the order rotates every repetition):

- ``explain``: GIM gradient × input (``gimlens.explain``: one forward + backward for the batch);
- ``gradient_x_input``: the same call path without GIM (``attribute(method="gradient_x_input",
  score_bos=True, batch_size=16)``, which is what ``explain`` runs, minus GIM's hooks);
- ``floor``: a bare forward + backward of the bridge with a leaf at ``hook_embed`` (no gimlens).

Prints the medians and the ratio explain / gradient_x_input (target: at most 1.15).

    python benchmarks/bench_explain.py [--reps 7] [--batch 16] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def _prompts(n: int) -> list[str]:
    from gimlens.data import load_prompts

    rows = load_prompts()
    # a mix of the three tasks, so lengths (and padding) vary as in real use
    by_task: dict[str, list[str]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r["prompt"])
    mixed = [p for group in zip(*by_task.values()) for p in group]
    return mixed[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    import gimlens
    from gimlens.attribution import attribute
    from gimlens.models import load_model

    model = load_model()
    texts = _prompts(args.batch)
    lengths = [len(model.to_tokens(t)[0]) for t in texts]
    width = max(lengths)
    pad = model.tokenizer.pad_token_id
    ids = torch.full((len(texts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        row = model.to_tokens(t)[0]
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1

    def run_explain():
        gimlens.explain(model, ids, attention_mask=mask)

    def run_plain():
        attribute(model, ids, attention_mask=mask, method="gradient_x_input", score_bos=True, batch_size=len(texts))

    def run_floor():
        emb = model.embed(ids).detach().requires_grad_()
        with model.hooks(fwd_hooks=[("hook_embed", lambda t, hook: emb)]):
            logits = model(ids, attention_mask=mask)
        logits[:, -1].max(-1).values.sum().backward()

    runs = {"explain": run_explain, "gradient_x_input": run_plain, "floor": run_floor}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:  # the floor must not build parameter gradients either
        p.requires_grad_(False)
    try:
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        names = list(runs)
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        for p, rg in flags:
            p.requires_grad_(rg)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SmolLM2-135M, batch {len(texts)} prompts of {min(lengths)}-{width} tokens, "
          f"{args.reps} interleaved repetitions, {torch.get_num_threads()} threads")
    for k, v in times.items():
        print(f"  {k:>17}: median {med[k]:.3f} s   (all: {', '.join(f'{x:.3f}' for x in v)})")
    print(f"  ratio explain (GIM) / gradient_x_input: {med['explain'] / med['gradient_x_input']:.3f}")
    print(f"  ratio gradient_x_input / bare forward+backward: {med['gradient_x_input'] / med['floor']:.3f}")


if __name__ == "__main__":
    main()
