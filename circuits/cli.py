"""`gimlens discover`: find a circuit for a task with edge attribution patching.

Loads the model (the embedded SmolLM2-135M-Instruct unless `--model` names a folder or hub
model), builds the task, finds a circuit of at most `--edges` edges with `circuits.discover`
(a scoring method: top-n by absolute score; or `edge-pruning` / `EAP-IG-iterative`; dangling
edges pruned), reports the circuit's normalised
faithfulness (exact edge patching on the same examples) and writes the circuit. All outputs are
written together at the end, each atomically; a failure leaves none of them. Bad arguments (an
unknown or absent `--device`, an output path that cannot be written) raise
[`GimlensError`][gimlens.errors.GimlensError] before the model is loaded. Progress bars (the
scoring, edge pruning's warm start and steps, the final evaluation) go to stderr unless
`--no-progress`.

Examples:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="gimlens discover")
    >>> add_arguments(parser)
    >>> args = parser.parse_args(["--task", "ioi", "-o", "circuit.json", "--gim"])
    >>> args.method, args.edges, args.gim, args.kv_edges
    ('EAP-IG-inputs', 500, True, 'grouped')
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from gimlens.errors import GimlensError
from gimlens.runtime import check_device, check_writable

from ._engine.model import Ablation
from .discover import ALGORITHMS
from .graph import KVEdges
from .tasks import TASKS

__all__ = ["add_arguments", "run"]

#: output option -> (allowed suffixes, `Graph.save` format; None: from the suffix)
_OUTPUTS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "output": ((".json",), "json"),
    "png": ((".png", ".svg", ".pdf"), None),
    "graphml": ((".graphml",), "graphml"),
    "eap_json": ((".json",), "eap-json"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `discover`'s options to `parser`."""
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="task to find a circuit for")
    parser.add_argument("--model", default=None, help="model folder or hub name (default: embedded SmolLM2)")
    parser.add_argument("--method", default="EAP-IG-inputs", choices=list(ALGORITHMS),
                        help="discovery method (circuits.discover)")
    parser.add_argument("--gim", action="store_true", help="gradients follow GIM's backward rules")
    parser.add_argument("--edges", type=int, nargs="+", default=500,
                        help="edges in the circuit (top-n by |score|); several sizes: one circuit each from one "
                             "search (circuits.discover), written to files named with the size (circuit-500.json)")
    parser.add_argument("--n-examples", "--n", dest="n", type=int, default=64,
                        help="number of task examples (spell it --n-examples under torchrun, "
                             "whose own options --nnodes/--nproc-per-node make --n ambiguous)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task's examples")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward pass")
    parser.add_argument("--ig-steps", type=int, default=5, help="interpolation steps of the IG methods")
    parser.add_argument("--steps", type=int, default=None,
                        help="edge-pruning: optimisation steps (one forward+backward of a batch each)")
    parser.add_argument("--lr", type=float, default=None, help="edge-pruning: learning rate")
    parser.add_argument("--rounds", type=int, default=None, help="EAP-IG-iterative: scoring rounds")
    parser.add_argument("--kv-edges", default="grouped", choices=[k.value for k in KVEdges],
                        help="k/v edges per KV head (grouped) or per query head (EAP-IG/MIB layout)")
    parser.add_argument("--ablation", default="corrupted", choices=[a.value for a in Ablation],
                        help="what edges outside the circuit carry")
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    parser.add_argument("-o", "--output", required=True, help="circuit JSON (own format, exact scores)")
    parser.add_argument("--png", default=None, help="image of the circuit (.png, .svg or .pdf)")
    parser.add_argument("--graphml", default=None, help="GraphML file of the circuit")
    parser.add_argument("--eap-json", default=None, help="EAP-IG / MIB compatible JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check(args: argparse.Namespace) -> dict[str, Path]:
    """Validate everything that can be checked without the model; return the output paths."""
    for value in _sizes(args):
        if value < 1:
            raise GimlensError(f"--edges must be >= 1, got {value}")
    if len(set(_sizes(args))) != len(_sizes(args)):
        raise GimlensError(f"--edges sizes must be distinct, got {_sizes(args)}")
    for name, low in (("n", 1), ("batch_size", 1), ("ig_steps", 1), ("seed", 0),
                      ("steps", 1), ("rounds", 1)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            flag = "n-examples" if name == "n" else name.replace("_", "-")
            raise GimlensError(f"--{flag} must be >= {low}, got {value}")
    outputs: dict[str, Path] = {}
    for key, (suffixes, _) in _OUTPUTS.items():
        value = getattr(args, key)
        if value is None:
            continue
        flag = "-o/--output" if key == "output" else f"--{key.replace('_', '-')}"
        path = check_writable(value, flag)
        if path.suffix.lower() not in suffixes:
            raise GimlensError(f"{flag} {value!r}: expected a file ending in {' or '.join(suffixes)}")
        if path.resolve() in {p.resolve() for p in outputs.values()}:
            raise GimlensError(f"{flag} {value!r} is also given for another output; expected distinct files")
        outputs[key] = path
    wanted = {"steps": "edge-pruning", "lr": "edge-pruning", "rounds": "EAP-IG-iterative"}
    for name, method in wanted.items():
        if getattr(args, name, None) is not None and args.method != method:
            raise GimlensError(f"--{name} applies to --method {method} only, got --method {args.method}")
    if getattr(args, "lr", None) is not None and not args.lr > 0:
        raise GimlensError(f"--lr must be > 0, got {args.lr}")
    return outputs


def _sizes(args: argparse.Namespace) -> list[int]:
    return args.edges if isinstance(args.edges, list) else [args.edges]


def _per_size(outputs: dict[str, Path], size: int) -> dict[str, Path]:
    """The output paths of one size of a curve: `circuit.json` -> `circuit-500.json`."""
    return {key: path.with_name(f"{path.stem}-{size}{path.suffix}") for key, path in outputs.items()}


def _write_all(graph, outputs: dict[str, Path]) -> None:
    """Write every output to a temporary file beside it, then move them all into place."""
    staged: list[tuple[Path, Path]] = []
    folders: list[Path] = []
    try:
        for key, path in outputs.items():
            folder = Path(tempfile.mkdtemp(prefix=".gimlens-discover-", dir=path.parent))
            folders.append(folder)
            tmp = folder / path.name
            graph.save(tmp, format=_OUTPUTS[key][1])
            staged.append((tmp, path))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    """Run `gimlens discover`; returns the exit status (0)."""
    outputs = _check(args)
    check_device(args.device)

    from gimlens.models import load_model

    from .discover import discover
    from .evaluate import faithfulness
    from .graph import Graph
    from .tasks import make

    from gimlens.distributed import init_from_env, is_main_process

    init_from_env()  # under `torchrun --nproc_per_node N`: each rank scores its share
    main = is_main_process()
    start = time.perf_counter()
    model = load_model(args.model, device=args.device)
    task = make(args.task, model, n=args.n, seed=args.seed)
    graph = Graph.from_model(model, kv_edges=args.kv_edges)
    sizes = _sizes(args)
    if max(sizes) > graph.n_valid_edges:
        raise GimlensError(f"--edges {max(sizes)} exceeds the {graph.n_valid_edges} edges of this model's graph")
    method = f"{args.method}{' + GIM' if args.gim else ''}"
    if main:
        print(f"{args.task}: {len(task)} examples, {graph.n_valid_edges} edges, scoring with {method}",
              file=sys.stderr)
    options = {k: getattr(args, k) for k in ("steps", "lr", "rounds") if getattr(args, k, None) is not None}
    show = not args.no_progress
    found = discover(model, graph, task, n_edges=sizes if len(sizes) > 1 else sizes[0], method=args.method,
                     ig_steps=args.ig_steps, gim=args.gim or None, batch_size=args.batch_size,
                     ablation=args.ablation, progress=show, **options)
    circuits = found if len(sizes) > 1 else {sizes[0]: graph}
    if main and show:
        print("evaluating the circuit" + ("s" if len(circuits) > 1 else "") + " (exact edge patching)",
              file=sys.stderr)
    faith = {n: faithfulness(model, g, task, batch_size=args.batch_size, ablation=args.ablation,
                             progress=show) for n, g in circuits.items()}
    if not main:  # every rank holds the same circuit; rank 0 writes it
        return 0
    files = {n: _per_size(outputs, n) if len(sizes) > 1 else outputs for n in sizes}
    for n, g in circuits.items():
        _write_all(g, files[n])
        print(f"circuit: {g.n_edges_in_graph} edges (at most {n} by {args.method}, dangling pruned), "
              f"{int(g.nodes_in_graph.sum())} nodes; normalised faithfulness {faith[n]:.3f}")
    written = [str(p) for f in files.values() for p in f.values()]
    print(f"wrote {', '.join(written)} in {time.perf_counter() - start:.1f} s")
    return 0
