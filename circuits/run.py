"""One validated run: the inputs every circuits algorithm shares, checked once.

[`Run.build`][circuits.run.Run.build] checks the model, the graph, the examples (tokens or a
task), the ablation, GIM's setting and the batching, and returns a frozen
[`Run`][circuits.run.Run] holding the model spec, the validated examples, the batches and GIM's
forward hooks. Per batch it gives the ablated sources ([`Run.ablated`][circuits.run.Run.ablated]:
the corrupted forward runs once per batch, on first use) and the clean reference
([`Run.reference`][circuits.run.Run.reference]: the clean metric, the fully ablated metric and
the clean next-token log-probabilities).

Every algorithm has a form that takes a run: `circuits.attribute.attribute_run`,
`circuits.evaluate.evaluate_run` / `faithfulness_run` / `faithfulness_curve_run`,
`circuits.mib.mib_metrics_run`, `circuits.edge_pruning.edge_pruning_run` and
`circuits.iterative.iterative_run`; the public functions of the same name without `_run` build
one and call it. With `keep_sources=True` a run keeps every batch's ablated sources, so
several algorithms on one run (edge pruning and its warm start, say) share one corrupted
forward per batch; with `False` (the default) it keeps only the batch in use, as one algorithm
alone needs.

Examples:
    >>> from gimlens.testing import tiny_model
    >>> from circuits.graph import Graph
    >>> from circuits.attribute import attribute_run
    >>> from circuits.evaluate import faithfulness_run
    >>> model = tiny_model("gpt2")
    >>> clean = model.to_tokens(["When Mary and John went", "When John and Mary went"])
    >>> corrupted = model.to_tokens(["When Anna and John went", "When Anna and Mary went"])
    >>> metric = lambda logits: logits[:, -1, 0] - logits[:, -1, 1]
    >>> run = Run.build(model, Graph.from_model(model), clean, corrupted, metric, batch_size=1,
    ...                 keep_sources=True)
    >>> len(run.batches), run.n_examples
    (2, 2)
    >>> g = attribute_run(run).apply_topn(20)
    >>> round(faithfulness_run(run, g.copy().reset(empty=False)), 6)  # every edge kept: 1
    1.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from gimlens.distributed import shard_range
from gimlens.errors import GimlensError
from gimlens.gim import GIMConfig, gim_hooks
from gimlens.runtime import require_lens_model, run_hooked
from gimlens.validation import coerce_enum

from ._engine.examples import Examples
from ._engine.memory import fit_batch_size
from ._engine.model import Ablation, Hook, ModelSpec, Sources, ablated_sources, run_model
from ._engine.patching import Patcher, blocks
from .graph import Graph

__all__ = ["Batch", "Reference", "Run"]


@dataclass(frozen=True)
class Batch:
    """One batch: the example indices (CPU, into the whole example set) and its clean tokens
    and attention mask on the model's device."""

    idx: Int[Tensor, " b"]
    tokens: Int[Tensor, "b pos"]
    mask: Int[Tensor, "b pos"] | None


@dataclass(frozen=True)
class Reference:
    """A batch's clean and fully ablated runs, as faithfulness and the learned circuits read them."""

    clean_metric: Float[Tensor, " b"]  #: float32, the clean run's metric
    base_metric: Float[Tensor, " b"]  #: float32, the corrupted run's (or the empty circuit's)
    clean_logprobs: Float[Tensor, "b vocab"]  #: the clean next-token log-probabilities
    last: Int[Tensor, " b"]  #: each example's last real position (CPU)


@dataclass(frozen=True)
class Run:
    """Validated inputs of one circuits computation (build it with [`Run.build`][circuits.run.Run.build]).

    The fields are fixed; the per-batch ablated sources, the mean sources and the references
    are computed on first use (inside the algorithm's `prepared(model)`) and cached.
    """

    model: Any
    graph: Graph  #: the layout the run was checked against (algorithms may take a copy)
    spec: ModelSpec
    examples: Examples
    ablation: Ablation
    gim: GIMConfig
    batch_size: int | None  #: after `max_memory` (None: all examples at once)
    batches: tuple[Batch, ...]  #: this process's share of the examples
    hooks: tuple[Hook, ...]  #: GIM's forward hooks (empty when GIM is off)
    sharded: bool  #: under torch.distributed, this process holds a part of the examples
    keep_sources: bool  #: keep every batch's ablated sources and reference (else the batch in use)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, model, graph: Graph, clean, corrupted=None, metric=None, *,
              ablation: Ablation | str = "corrupted", gim: GIMConfig | bool | dict | None = None,
              batch_size: int | None = None, attention_mask: Tensor | None = None,
              max_memory: int | str | None = None, keep_sources: bool = False) -> "Run":
        """Check every input (bad ones raise `GimlensError`); runs nothing but, with GIM on, the
        one two-token probe per model by which `gim_hooks` finds hook points that never fire.

        Args:
            model: a TransformerLens `TransformerBridge` (or `HookedTransformer`).
            graph: a [`Graph`][circuits.graph.Graph] of `model`.
            clean, corrupted, metric, attention_mask: int tokens `[n, pos]` of equal shape and
                `metric(logits, indices)` or `metric(logits)`, or a task as `clean`.
            ablation: `"corrupted"`, `"mean"` or `"zero"`.
            gim: GIM's rules for every gradient of the run (`True`, a `GIMConfig` or a dict).
            batch_size: examples per forward pass (`None`: all at once).
            max_memory: a budget (bytes or `"4GB"`) that lowers `batch_size`.
            keep_sources: keep every batch's ablated sources (several passes over the batches).
        """
        require_lens_model(model)
        if not isinstance(graph, Graph):
            raise GimlensError(f"graph must be a circuits.Graph, got {type(graph).__name__}")
        spec = ModelSpec.read(model)
        graph.check_matches(model)
        ablation = coerce_enum(Ablation, ablation, "ablation")
        config = GIMConfig.coerce(gim)
        ex = Examples.resolve(model, clean, corrupted, metric, attention_mask)
        own = shard_range(len(ex))  # under torch.distributed: this rank's contiguous share
        if max_memory is not None:
            batch_size = fit_batch_size(model, graph, ex.clean.shape[1], max_memory,
                                        upper=batch_size or max(len(own), 1))
        batches = []
        for idx in ex.batches(batch_size, n=len(own)):
            idx = idx + own.start
            batches.append(Batch(idx, *ex.tokens("clean", idx, spec.device)))
        hooks = () if config.is_off else tuple(gim_hooks(model, config))
        return cls(model, graph, spec, ex, ablation, config, batch_size, tuple(batches), hooks,
                   own != range(len(ex)), bool(keep_sources))

    @property
    def n_examples(self) -> int:
        """All examples (over every process)."""
        return len(self.examples)

    @property
    def frozen(self) -> bool:
        """GIM's frozen norm scale applies to the gradients."""
        return self.gim.freeze_norm

    @cached_property
    def all_blocks(self) -> dict:
        """The patching blocks of every valid edge (`circuits._engine.patching.blocks`)."""
        return blocks(self.spec, self.graph, self.graph.valid.cpu())

    def check_graph(self, graph: Graph | None) -> Graph:
        """`graph` (default: the run's), checked to have the run's layout."""
        if graph is None:
            return self.graph
        if not isinstance(graph, Graph) or not graph.same_layout(self.graph):
            raise GimlensError("graph must be a circuits.Graph with the run's layout "
                               f"({self.graph!r}), got {graph!r}")
        return graph

    def mean(self) -> Sources | None:
        """Per-position mean sources over all corrupted examples (`ablation="mean"`), else None."""
        if self.ablation is not Ablation.MEAN:
            return None
        if ("mean",) not in self._cache:
            self._cache["mean",] = self.examples.mean_sources(self.model, self.spec, self.batch_size)
        return self._cache["mean",]

    def ablated(self, i: int, *, writable: bool = False, score: bool = True
                ) -> tuple[Sources, Tensor | None]:
        """Batch `i`'s ablated sources and, for `ablation="corrupted"` and `score`, the corrupted
        run's metric (detached; else None). One corrupted forward per batch and run (a second
        only when the metric is asked for after a call with `score=False`). `writable`: sources
        the caller may overwrite (a copy of `resid` when the run keeps them)."""
        key = ("ablated", i)
        corrupted = self.ablation is Ablation.CORRUPTED
        if key not in self._cache or (score and corrupted and self._cache[key][1] is None):
            if not self.keep_sources:  # hold one batch at a time
                for old in [k for k in self._cache if k[0] == "ablated"]:
                    del self._cache[old]
            batch = self.batches[i]
            with torch.no_grad():
                sources, logits = ablated_sources(
                    self.model, self.spec, self.ablation,
                    *self.examples.tokens("corrupted", batch.idx, self.spec.device), self.mean())
                metric = self.examples.score(logits, batch.idx).detach() if corrupted and score \
                    else None
            self._cache[key] = (sources, metric)
        sources, metric = self._cache[key]
        if writable:
            if self.keep_sources:
                sources = Sources(sources.resid.clone(), sources.z)
            else:
                del self._cache[key]
        return sources, metric if score else None

    def reference(self, i: int) -> Reference:
        """Batch `i`'s clean run (one forward, no hooks) and its fully ablated metric: the
        corrupted run's, or the empty circuit's patched run for `mean` / `zero`."""
        key = ("reference", i)
        if key not in self._cache:
            if not self.keep_sources:  # hold one batch at a time
                for old in [k for k in self._cache if k[0] == "reference"]:
                    del self._cache[old]
            batch = self.batches[i]
            sources, corrupted_metric = self.ablated(i)
            with torch.no_grad():
                logits = run_hooked(self.model, batch.tokens, attention_mask=batch.mask)
                n = len(batch.idx)
                last = (torch.full((n,), batch.tokens.shape[1] - 1) if batch.mask is None
                        else batch.mask.cpu().cumsum(1).argmax(1))
                logprobs = logits[torch.arange(n), last.to(logits.device)].float().log_softmax(-1)
                clean = self.examples.score(logits, batch.idx).float()
                del logits
                if corrupted_metric is None:
                    valid = self.graph.valid.to(self.spec.device)
                    patcher = Patcher(self.spec, valid, self.all_blocks, sources, frozen=self.frozen)
                    hooks = patcher.hooks() + list(self.hooks)
                    base = self.examples.score(run_model(self.model, batch.tokens, batch.mask, hooks),
                                               batch.idx).float()
                else:
                    base = corrupted_metric.float()
            self._cache[key] = Reference(clean, base, logprobs, last)
        return self._cache[key]

    def require_single_process(self, what: str) -> None:
        """Raise unless this process holds every example (no torch.distributed sharding)."""
        if self.sharded:
            raise GimlensError(f"{what} run in one process; torch.distributed sharding is not "
                               "supported for them")
