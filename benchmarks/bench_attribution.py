"""Every attribution method on a real model (SmolLM2 or Gemma 3 270M) over the shipped prompt set: faithfulness and time.

For each prompt of ``gimlens/data/prompts.jsonl`` (IOI, capitals, factual completions) the target
is the expected answer's logit; as in the GIM paper, only prompts the model answers correctly
(top-1) are evaluated. Per method it prints, averaged over prompts:

- comprehensiveness (higher is better) and sufficiency (lower is better) by the GIM paper's
  protocol (:mod:`gimlens.evaluate`; ``cap`` averages over k ≤ the prompt's rankable tokens, the
  paper's script zero-fills to k = 50, shown as ``comp(paper)``);
- Spearman agreement with leave-one-out ablation (the feature_ablation row is 1 by definition);
- seconds per prompt for the attribution alone (batched, ``--batch`` prompts per call);
- integrated gradients' median completeness delta.

A random ranking is included as a floor. Then the paired differences GIM − gradient × input and
GIM − integrated gradients in comprehensiveness (mean ± standard error, and how often GIM wins).

    python benchmarks/bench_attribution.py [--model gemma-3-270m] [--per-task 12] [--steps 32] [--ig-gim] [--threads 1]

Cost on CPU: every method's faithfulness needs ~20 forwards per prompt, integrated gradients
``steps`` forward+backward passes (SmolLM2 needs about 32 Gauss-Legendre steps for a completeness
delta well under a logit; 8 steps leave deltas of several logits). The default (12 correct prompts
per task, 36 in all; IG under GIM only with ``--ig-gim``) took 7.5 minutes (3.6 min of CPU) on one
thread of a busy 2-core machine; ``--per-task 0`` evaluates every correct prompt (114): 35 minutes
there (13 min of CPU). One thread is
the default because on a shared machine two OpenMP threads stall on each other's time slices
(measured here: a one-row forward took 0.27 s on one thread, 0.87 s on two).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="a load_model() name: the embedded SmolLM2 (default) or gemma-3-270m")
    parser.add_argument("--per-task", type=int, default=12, help="correct prompts per task (0: all)")
    parser.add_argument("--steps", type=int, default=32, help="integrated-gradients steps (Gauss-Legendre)")
    parser.add_argument("--ig-gim", action="store_true", help="also integrated gradients under GIM")
    parser.add_argument("--batch", type=int, default=16, help="prompts per attribute() call")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    from gimlens.attribution import attribute
    from gimlens.data import load_prompts
    from gimlens.evaluate import ablation_agreement, attribution_faithfulness as faithfulness
    from gimlens.models import load_model

    start = time.perf_counter()
    model = load_model(args.model)
    rows = load_prompts()
    tok = model.tokenizer
    answers = [tok.encode(r["answer"], add_special_tokens=False)[0] for r in rows]
    correct = []
    with torch.no_grad():
        for r, a in zip(rows, answers):
            if int(model(model.to_tokens(r["prompt"]))[0, -1].argmax()) == a:
                correct.append(r)
    counts = ", ".join(f"{t} {sum(r['task'] == t for r in correct)}" for t in ("ioi", "capitals", "factual"))
    print(f"{model.cfg.model_name}, {torch.get_num_threads()} threads: {len(correct)} of {len(rows)} prompts "
          f"answered correctly ({counts})")
    if args.per_task:
        correct = [r for t in ("ioi", "capitals", "factual") for r in [x for x in correct if x["task"] == t][: args.per_task]]
        print(f"evaluating the first {args.per_task} correct prompts of each task: {len(correct)} prompts")
    # batches of one task each: similar lengths, little padding
    batches = []
    for t in ("ioi", "capitals", "factual"):
        group = [r for r in correct if r["task"] == t]
        batches += [group[i: i + args.batch] for i in range(0, len(group), args.batch)]
    correct = [r for batch in batches for r in batch]

    methods = {
        "gradient_x_input": dict(method="gradient_x_input"),
        "gim": dict(method="gim"),
        f"integrated_gradients({args.steps})": dict(method="integrated_gradients", steps=args.steps),
        "feature_ablation": dict(method="feature_ablation"),
    }
    if args.ig_gim:
        methods[f"integrated_gradients+gim({args.steps})"] = dict(method="integrated_gradients", steps=args.steps, gim=True)
    results: dict[str, dict] = {}
    references = []
    for name, kw in {"feature_ablation": methods.pop("feature_ablation"), **methods}.items():
        comp, comp_paper, suff, rho, delta, seconds = [], [], [], [], [], 0.0
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            attr = attribute(model, [r["prompt"] for r in batch], target=[r["answer"] for r in batch],
                             batch_size=64, **kw)
            seconds += time.perf_counter() - t0
            if name == "feature_ablation":
                references.append(attr)
            _collect(model, attr, references[i], comp, comp_paper, suff, rho, faithfulness, ablation_agreement)
            if attr.delta is not None:
                delta += attr.delta.tolist()
        results[name] = dict(comp=comp, comp_paper=comp_paper, suff=suff, rho=rho, delta=delta,
                             per_prompt=seconds / len(correct))
    # a random ranking as a floor (same inputs and targets as the ablation reference)
    g = torch.Generator().manual_seed(0)
    comp, comp_paper, suff, rho = [], [], [], []
    for ref in references:
        rand = ref.__class__.from_dict(ref.to_dict())
        rand.scores = torch.randn(rand.scores.shape, generator=g) * rand.scored
        rand.method = "random"
        _collect(model, rand, ref, comp, comp_paper, suff, rho, faithfulness, ablation_agreement)
    results["random"] = dict(comp=comp, comp_paper=comp_paper, suff=suff, rho=rho, delta=[], per_prompt=0.0)

    print(f"\n{'method':>30} {'comp↑':>7} {'comp(paper)↑':>12} {'suff↓':>7} {'ρ(LOO)↑':>8} {'s/prompt':>9} {'IG delta':>9}")
    for name, r in results.items():
        d = f"{_median(r['delta']):.2e}" if r["delta"] else "-"
        print(f"{name:>30} {_mean(r['comp']):7.3f} {_mean(r['comp_paper']):12.3f} {_mean(r['suff']):7.3f} "
              f"{_mean(r['rho']):8.3f} {r['per_prompt']:9.3f} {d:>9}")
    tasks = [r["task"] for r in correct]
    print("\ncomprehensiveness by task:")
    for name, r in results.items():
        parts = []
        for t in ("ioi", "capitals", "factual"):
            vals = [c for c, tt in zip(r["comp"], tasks) if tt == t]
            parts.append(f"{t} {_mean(vals):.3f}")
        print(f"{name:>30}  " + "  ".join(parts))
    gim = results["gim"]["comp"]
    for other in ("gradient_x_input", f"integrated_gradients({args.steps})"):
        diff = [a - b for a, b in zip(gim, results[other]["comp"]) if not (math.isnan(a) or math.isnan(b))]
        mean, se = _mean(diff), _stderr(diff)
        wins = sum(x > 0 for x in diff)
        verdict = "GIM higher" if mean - 2 * se > 0 else ("GIM lower" if mean + 2 * se < 0 else "no clear difference")
        print(f"\ncomprehensiveness GIM − {other}: {mean:+.3f} ± {se:.3f} (s.e.), GIM higher on {wins}/{len(diff)} "
              f"prompts -> {verdict}")
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")


def _collect(model, attr, reference, comp, comp_paper, suff, rho, faithfulness, ablation_agreement) -> None:
    f = faithfulness(model, attr, batch_size=64)
    paper = f.comprehensiveness_curve.nan_to_num(0.0).sum(-1) / f.max_k  # the paper's zero-fill
    comp += f.comprehensiveness.tolist()
    comp_paper += paper.tolist()
    suff += f.sufficiency.tolist()
    rho += ablation_agreement(model, attr, reference=reference).tolist()


def _mean(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _median(xs) -> float:
    return float(torch.tensor(xs).median()) if xs else float("nan")


def _stderr(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


if __name__ == "__main__":
    main()
