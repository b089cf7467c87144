"""`gimlens layerwise`: layer-wise IG flows of one prompt, written as JSON (and a heatmap).

Example (shell):

```sh
gimlens layerwise "When Mary and John went to the store" --layers 0,5 \\
    --granularity layer,att -o flows.json --plot flows.png
```

Without `--model` the embedded SmolLM2-135M-Instruct is used (offline). The device and every
output path are checked before the model loads; each file is written atomically, and a failed
image removes the JSON written just before it. A progress bar (one step per layer and
granularity) goes to stderr unless `--no-progress`.
"""

from __future__ import annotations

import argparse

from ..errors import GimlensError
from ..quadrature import Quadrature
from ..runtime import check_device, check_writable
from .baselines import Baseline
from .boundaries import HeadScores

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="the prompt")
    parser.add_argument("--model", default=None,
                        help="hub name or local folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--layers", default=None,
                        help="comma-separated layer indices, e.g. 0,5 (default: every layer)")
    parser.add_argument("--granularity", default="layer",
                        help="comma-separated: layer, att, mlp, or all (default: layer)")
    parser.add_argument("--baseline", default=Baseline.INPUT_TOKEN.value,
                        help="zero, input_token, itb_zero_ratio or itb_map_ratio, or per granularity "
                             "as layer=zero,att=input_token (default: input_token)")
    parser.add_argument("--steps", type=int, default=32, help="quadrature nodes (default: 32)")
    parser.add_argument("--quadrature", default=None, choices=[q.value for q in Quadrature],
                        help="default: gauss_legendre, graded towards 0 for zero baselines")
    parser.add_argument("--gim", action="store_true", help="GIM's backward rules (default settings)")
    parser.add_argument("--head-scores", default=HeadScores.OWN.value,
                        choices=[h.value for h in HeadScores],
                        help="att: each head's own norm (own, as LIG) or shares of the whole output")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward/backward")
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (by default one bar on stderr, a step per flow)")
    parser.add_argument("-o", "--output", default=None, help="write the JSON result here")
    parser.add_argument("--plot", default=None, help="write a heatmap image here (png, svg, pdf)")


def run(args: argparse.Namespace) -> int:
    from ..models import load_model
    from .core import layerwise_ig

    layers = _int_list(args.layers, "--layers")
    granularity = [g.strip() for g in args.granularity.split(",") if g.strip()]
    baseline = _baseline(args.baseline)
    check_device(args.device)
    out = check_writable(args.output, "-o") if args.output else None
    plot = check_writable(args.plot, "--plot") if args.plot else None
    if plot is not None:
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = FigureCanvasBase.get_supported_filetypes()
        if plot.suffix.lower().lstrip(".") not in kinds:
            raise GimlensError(f"--plot {args.plot!r}: unknown image type; expected one of "
                               f"{', '.join(sorted('.' + k for k in kinds))}")
    if out is not None and plot is not None and out.resolve() == plot.resolve():
        raise GimlensError("--plot and -o name the same file")
    model = load_model(args.model, device=args.device)
    result = layerwise_ig(
        model, args.text, layers=layers,
        granularity=granularity[0] if granularity == ["all"] else granularity,
        baseline=baseline, steps=args.steps, quadrature=args.quadrature, gim=bool(args.gim),
        head_scores=args.head_scores, batch_size=args.batch_size, progress=not args.no_progress,
    )
    existed = out is not None and out.exists()
    if out is not None:
        result.save(out)
    if plot is not None:
        try:
            result.save_plot(plot)
        except BaseException:  # all or nothing: no JSON left without its image
            if out is not None and not existed:
                out.unlink(missing_ok=True)
            raise
    for (layer, g), flow in sorted(result.flows.items(), key=lambda kv: (kv[0][0], kv[0][1].value)):
        err = flow.completeness_error.abs()
        rel = (err / flow.total.clamp_min(1e-12))[flow.total > 1e-6]
        worst = f"{float(rel.max()):.1e}" if rel.numel() else "n/a"
        print(f"layer {layer:>3} {g.value:<5} baseline {flow.baseline.value:<14} "
              f"max |completeness error| {float(err.max()):.2e} (relative {worst})")
    if args.output:
        print(f"wrote {args.output}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GimlensError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise GimlensError(f"{flag} is empty; give at least one layer index")
    return values


def _baseline(text: str) -> str | dict[str, str]:
    if "=" not in text:
        return text.strip()
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise GimlensError(f"--baseline takes a name or granularity=name pairs, got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}
