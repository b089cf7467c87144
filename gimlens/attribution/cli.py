"""`gimlens explain`: token attribution for one prompt, written as JSON (and a heatmap).

Example (shell):

```sh
gimlens explain "The capital of France is" --target " Paris" --contrast " Rome" \\
    -o paris.json --plot paris.png
```

Everything is validated before the model loads (the device, and that every output path can be
written); the JSON and the image are written only after the attribution succeeded, each
atomically (a failed run leaves no file behind, not even the JSON when the image fails).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from ..errors import GimlensError
from ..validation import check_int
from ..runtime import atomic_write, check_device, check_writable
from .methods import Method
from .targets import LogitDiff, Readout, TokenTarget

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="the prompt to explain")
    parser.add_argument("--model", default=None, help="model folder or hub name (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--method", default=Method.GIM.value, choices=[m.value for m in Method], help="attribution method (default: gim)")
    parser.add_argument("--target", default=None, help="target token text, e.g. ' Paris' (several tokens: a continuation); default: the top prediction")
    parser.add_argument("--contrast", default=None, help="explain logit(target) - logit(contrast), e.g. ' Rome' (without --target: the top prediction)")
    parser.add_argument("--logprob", action="store_true", help="explain the log-probability instead of the logit")
    parser.add_argument("--position", type=int, default=-1, help="position of the target logit (default: -1, the last token)")
    parser.add_argument("--baseline", default=None, help="baseline token text (one token; default ' ')")
    parser.add_argument("--steps", type=int, default=None, help="integration steps for integrated_gradients (default 20)")
    parser.add_argument("--score-bos", action="store_true", help="also score the BOS token")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    parser.add_argument("--device", default=None, help="torch device for the model (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-o", "--output", required=True, help="where to write the attribution JSON")
    parser.add_argument("--plot", default=None, help="also write a heatmap image (.png, .svg, .pdf)")


def run(args: argparse.Namespace) -> int:
    target = _target(args)
    _validate(args)
    from ..models import load_model
    from .attribute import attribute

    model = load_model(args.model, device=args.device)
    result = attribute(
        model,
        args.text,
        method=args.method,
        target=target,
        baseline=args.baseline,
        steps=args.steps,
        batch_size=args.batch_size,
        score_bos=args.score_bos,
        progress=not args.no_progress,
    )
    image = _render(result, args.plot) if args.plot else None
    existed = Path(args.output).exists()
    result.save(args.output, indent=1)
    if image is not None:
        try:
            atomic_write(args.plot, image)
        except BaseException:  # all or nothing: no JSON left without its image
            if not existed:
                Path(args.output).unlink(missing_ok=True)
            raise
    _print(result, args)
    return 0


def _target(args):
    readout = Readout.LOGPROB if args.logprob else Readout.LOGIT
    if args.contrast is not None:
        if args.logprob:
            raise GimlensError("--contrast explains a logit difference; --logprob does not apply (log-probability differences equal it)")
        return LogitDiff(args.target, args.contrast, position=args.position)
    return TokenTarget(args.target, position=args.position, readout=readout)


def _validate(args) -> None:
    if args.text == "":
        raise GimlensError("the text is empty; expected a prompt with at least one token")
    if args.target == "":
        raise GimlensError("--target is empty; expected the text of a target token, e.g. ' Paris'")
    if args.steps is not None and args.method != Method.INTEGRATED_GRADIENTS.value:
        raise GimlensError(f"--steps applies to integrated_gradients only, not to {args.method}")
    check_int("--steps", args.steps, minimum=1, allow_none=True)
    check_int("--batch-size", args.batch_size, minimum=1)
    check_device(args.device)
    out = check_writable(args.output, "-o")
    if out.suffix.lower() != ".json":
        raise GimlensError(f"-o {args.output!r}: expected a .json file name")
    if args.plot is not None:
        plot = check_writable(args.plot, "--plot")
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = FigureCanvasBase.get_supported_filetypes()
        if plot.suffix.lower().lstrip(".") not in kinds:
            raise GimlensError(
                f"--plot {args.plot!r}: unknown image type; expected one of {', '.join(sorted('.' + k for k in kinds))}"
            )
        if plot.resolve() == out.resolve():
            raise GimlensError("--plot and -o name the same file")


def _render(result, path: str) -> bytes:
    fig = result.plot()
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lower().lstrip("."), dpi=150)
    return buf.getvalue()


def _print(result, args) -> None:
    out = sys.stdout
    print(f"{result.method}: {result.describe_target(0)} = {float(result.target_values[0].sum()):.4g}", file=out)
    scores = result.seq[0]
    for tok, s, scored in zip(result.tokens[0], scores.tolist(), result.scored[0].tolist()):
        print(f"  {tok!r:>20} {s:+.4f}" + ("" if scored else "  (not scored)"), file=out)
    if result.delta is not None:
        print(f"completeness delta: {float(result.delta.flatten()[0]):.3g}", file=out)
    print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""), file=out)
