"""Destination gradients -> edge scores: `scores[src, dst] += diff[src] . grad[dst]`, summed over
positions and `d_model`, with few wide GEMMs.

Backward reaches the layers in order, last first, so the gradients of one layer all arrive
before any of the layer below. The destinations of consecutive layers (the last layer's with the
logits) form chunks of at least `MIN_COLUMNS` columns; a chunk's gradients gather in one buffer,
and the buffer is multiplied (one GEMM against the `diff` rows that feed it) when the first
gradient of the next chunk arrives, or at the end of the pass ([`Accumulator.end_pass`]
[circuits._engine.accumulate.Accumulator.end_pass]). With `defer`, the buffers are summed over all
gradient points of a batch and multiplied once, in [`Accumulator.flush`]
[circuits._engine.accumulate.Accumulator.flush].

**Neuron scores** (`neurons` given): every gradient that reaches the score GEMM is also summed
per upstream count `u` (the destinations fed by exactly the sources `[0, u)`). By residual
additivity the gradient at source `r`'s output is the sum of the gradients of every destination
it feeds, i.e. of the sums of all counts `u > r`; `flush` adds `sum over b, s of diff[r] * G[r]`
to `neurons[r]` with these suffix sums, `n_forward x B x S x d_model` work in all.

**EAP-IG's MLP node rule** (`mlp_input` given): each MLP's own input column is also multiplied
with that MLP's output row, per dimension: `mlp_input[mlp_row(l)] += sum over b, s of
diff[mlp_row(l)] * G[mlp_col(l)]` (EAP-IG's `attribute_node` pairs an MLP's output difference
with the gradient at its input, `hook_mlp_in`), `L x B x S x d_model` work.

Examples:
    >>> import torch
    >>> from gimlens.testing import tiny_model
    >>> from circuits.graph import Graph
    >>> from circuits._engine.model import ModelSpec
    >>> model = tiny_model("gpt2")
    >>> spec, graph = ModelSpec.read(model), Graph.from_model(model)
    >>> diff, grads = torch.randn(graph.n_forward, 1, 3, 32), torch.randn(graph.n_backward, 1, 3, 32)
    >>> scores = torch.zeros(graph.n_forward, graph.n_backward)
    >>> acc = Accumulator.build(spec, graph, scores, diff, split_kv=False, defer=False)
    >>> acc.slot(spec.n_layers - 1, slice(graph.n_backward - 1, graph.n_backward))[:] = grads[-1:]
    >>> for layer in reversed(range(spec.n_layers)):  # the order backward reaches them
    ...     cols = slice(graph.backward_index(layer, 0, "q"), graph.backward_index(layer) + 1)
    ...     acc.slot(layer, cols)[:] = grads[cols]
    >>> acc.end_pass()
    >>> torch.allclose(scores[0], torch.einsum("bsd,nbsd->n", diff[0], grads), atol=1e-4)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from .model import ModelSpec

__all__ = ["Accumulator", "MIN_COLUMNS"]

#: Destination columns gathered per score GEMM (thin GEMMs run at a fraction of the speed).
MIN_COLUMNS = 64


@dataclass(frozen=True)
class Chunk:
    """Destination columns `[c0, c1)` of consecutive layers, fed by the first `rows` sources."""

    c0: int
    c1: int
    rows: int


@dataclass
class Accumulator:
    """Collects destination gradients chunk by chunk and adds `diff . grads` to `scores`.

    `slot(layer, cols)` hands out the buffer rows for the gradients of columns `cols` of
    `layer`; writing them there is all a hook does. Columns left unwritten (the k/v columns of
    a split-KV model, scored separately through `gemm`)
    are zero.
    """

    scores: Float[Tensor, "n_fwd n_bwd"]
    diff: Float[Tensor, "n_fwd B S d"]
    chunks: list[Chunk]
    chunk_of: list[int]  # layer -> chunk
    defer: bool
    split_kv: bool
    current: tuple[int, Tensor] | None = None  # (chunk, its buffer) being filled
    summed: dict = field(default_factory=dict)  # chunk -> buffer summed over points (defer)
    free: list = field(default_factory=list)  # buffers to reuse (fresh memory is slow to touch)
    neurons: Float[Tensor, "n_fwd d"] | None = None  # neuron scores to add to (None: edges only)
    n_up: list = field(default_factory=list)  # per column, its upstream count (with neurons)
    grad_sums: dict = field(default_factory=dict)  # upstream count -> summed gradients
    mlp_input: Float[Tensor, "n_fwd d"] | None = None  # EAP-IG's MLP rule (None: not asked)
    mlp_cols: dict = field(default_factory=dict)  # MLP input column -> that MLP's output row

    @classmethod
    def build(cls, spec: ModelSpec, graph, scores, diff, *, split_kv: bool, defer: bool,
              neurons: Tensor | None = None, mlp_input: Tensor | None = None) -> "Accumulator":
        L = spec.n_layers
        per = max(1, math.ceil(MIN_COLUMNS * L / graph.n_backward))
        chunks, chunk_of = [], []
        for first in range(0, L, per):
            last = min(first + per, L) - 1
            final = last == L - 1
            c1 = graph.n_backward if final else graph.backward_index(last) + 1
            rows = spec.n_forward if final else spec.upstream(last, mlp=True)
            chunk_of += [len(chunks)] * (last - first + 1)
            chunks.append(Chunk(graph.backward_index(first, 0, "q"), c1, rows))
        n_up = graph.upstream_counts.tolist() if neurons is not None else []
        mlp_cols = {graph.backward_index(l): spec.mlp_row(l) for l in range(L)} \
            if mlp_input is not None else {}
        return cls(scores, diff, chunks, chunk_of, defer, split_kv, neurons=neurons, n_up=n_up,
                   mlp_input=mlp_input, mlp_cols=mlp_cols)

    def slot(self, layer: int, cols: slice) -> Float[Tensor, "n B S d"]:
        """The part of `layer`'s chunk buffer that receives the gradients of columns `cols`; the
        previous chunk is multiplied first when this is the first gradient of a new chunk."""
        chunk = self.chunk_of[layer]
        if self.current is None or self.current[0] != chunk:
            self._done()
            buf = self.free.pop() if self.free else torch.empty(
                max(c.c1 - c.c0 for c in self.chunks), *self.diff.shape[1:], device=self.diff.device)
            if self.split_kv:  # its k/v columns are never written here
                buf.zero_()
            self.current = (chunk, buf)
        c0 = self.chunks[chunk].c0
        return self.current[1][cols.start - c0: cols.stop - c0]

    def end_pass(self) -> None:
        """The backward pass is over: multiply (or, with `defer`, sum) the last chunk."""
        self._done()

    def _done(self) -> None:
        if self.current is None:
            return
        chunk, buf = self.current
        self.current = None
        c = self.chunks[chunk]
        if not self.defer:
            self.gemm(c.rows, slice(c.c0, c.c1), buf[: c.c1 - c.c0])
        elif chunk not in self.summed:
            self.summed[chunk] = buf
            return
        else:
            self.summed[chunk].add_(buf)
        self.free.append(buf)

    def flush(self) -> None:
        """Multiply the buffers summed over the gradient points (with `defer`)."""
        self._done()
        for chunk, grads in self.summed.items():
            c = self.chunks[chunk]
            self.gemm(c.rows, slice(c.c0, c.c1), grads[: c.c1 - c.c0])
        self.summed.clear()
        if self.neurons is not None and self.grad_sums:
            total, stop = None, self.diff.shape[0]
            for u in sorted(self.grad_sums, reverse=True):  # suffix sums, the logits' first
                if u < stop and total is not None:
                    self.neurons[u:stop] += torch.einsum("nbsd,bsd->nd", self.diff[u:stop], total)
                total = self.grad_sums[u] if total is None else total + self.grad_sums[u]
                stop = u
            if stop > 0:
                self.neurons[:stop] += torch.einsum("nbsd,bsd->nd", self.diff[:stop], total)
            self.grad_sums.clear()

    def gemm(self, rows: int, cols: slice, grads: Float[Tensor, "n B S d"]) -> None:
        """`scores[:rows, cols] += diff[:rows] . grads`, summed over examples, positions and
        `d_model`."""
        out, n = self.scores[:rows, cols], grads.shape[0]
        out.addmm_(self.diff[:rows].reshape(rows, -1), grads.reshape(n, -1).T)
        if self.neurons is not None:
            self._sum_by_upstream(cols, grads)
        for col, row in self.mlp_cols.items():
            if cols.start <= col < cols.stop:
                self.mlp_input[row] += torch.einsum("bsd,bsd->d", self.diff[row], grads[col - cols.start])

    def _sum_by_upstream(self, cols: slice, grads: Float[Tensor, "n B S d"]) -> None:
        """Add the gradients of columns `cols` to the sums of their upstream counts."""
        values, lengths = torch.unique_consecutive(torch.tensor(self.n_up[cols]), return_counts=True)
        for u, run in zip(values.tolist(), grads.split(lengths.tolist())):
            part = run.sum(0)
            self.grad_sums[u] = part if u not in self.grad_sums else self.grad_sums[u].add_(part)
