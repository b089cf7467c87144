"""Every public entry point leaves the model exactly as it found it: after success, after an
exception raised inside the caller's metric, after an exception raised inside a forward pass
(a user hook), and after bad input.

One row of `ROWS` per entry point (captum's `test_hook_removal.py` is the model): the table is
crossed with the four cases. "As found" is `helpers.model_state`: hooks by handle id on every
module and hook point (torch's forward / pre / backward hooks, the HookPoint's own lists, torch's
global hooks), `training`, every parameter's `requires_grad`, `.grad`, storage and in-place
version, every buffer, and the config flags (`use_attn_result`, `use_split_qkv_input`,
`use_hook_mlp_in`, ...). The model is found in an unusual state (train mode, a `.grad` set, one
parameter frozen, a hook of the caller's own in place) so that code which "restores" defaults
instead of what it found fails too.

The failing runs raise half-way: a success run first counts the metric calls (or the forward
passes through the user hook), then the failing run raises at the middle call, inside the
algorithm rather than in its set-up.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import pytest
import torch

import circuits
import gimlens
from circuits import Graph
from circuits.edge_pruning import edge_pruning
from circuits.iterative import iterative
from circuits.mib import mib_edge_count, mib_metrics
from circuits.tasks import make
from gimlens import GIM, GimlensError, gim_hooks
from gimlens.attribution.methods import Method as TokenMethod
from gimlens.evaluate import ablation_agreement, attribution_faithfulness

from helpers import assert_state_equal, model_state

TEXTS = ["When Mary and John went to the store, John gave a drink to", "The capital of France is"]
PAIRS = [("When Mary and John went to the store, John gave a drink to",
          "When Mary and John went to the store, Anna gave a drink to"),
         ("When Tom and Anna went to the park, Anna gave a ball to",
          "When Tom and Anna went to the park, Bob gave a ball to")]


@dataclass(frozen=True)
class Data:
    """Inputs of one model for every row: token pairs, a metric, prompts, ready-made results."""

    model: Any
    clean: torch.Tensor
    corrupted: torch.Tensor
    metric: Callable
    attribution: Any  # a gimlens.Attribution of TEXTS
    circuit: Graph  # a graph with a random circuit, node and neuron selection

    def graph(self, **kw) -> Graph:
        return Graph.from_model(self.model, **kw)


@lru_cache(maxsize=None)
def _data(model) -> Data:
    clean, corrupted = model.to_tokens([c for c, _ in PAIRS]), model.to_tokens([c for _, c in PAIRS])
    w = torch.randn(model.cfg.d_vocab, generator=torch.Generator().manual_seed(0))

    def metric(logits, idx):
        return logits[:, -1] @ w.to(logits)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attribution = gimlens.attribute(model, TEXTS)
    g = Graph.from_model(model)
    gen = torch.Generator().manual_seed(0)
    g.in_graph = torch.rand(g.valid.shape, generator=gen) < 0.5
    g.nodes_in_graph = torch.rand(g.n_forward, generator=gen) < 0.7
    g.neurons_in_graph = torch.rand(g.n_forward, model.cfg.d_model, generator=gen) < 0.7
    g.scores = torch.randn(g.valid.shape, generator=gen)  # scored: selection refuses an unscored graph
    return Data(model, clean, corrupted, metric, attribution, g)


@dataclass(frozen=True)
class Row:
    """One entry point: `call(model, data, **kw)` runs it; `bad` are keywords that make its input
    bad (a `GimlensError` matching `match`); `metric`: whether it calls `data.metric`."""

    name: str
    arch: str
    call: Callable
    bad: dict = field(default_factory=dict)
    match: str = ""
    metric: bool = False
    forward: bool = True  # whether it runs a forward pass (so a hook of the caller's can raise in one)


def _gim_context(m, d, **kw):
    leaf = m.embed(d.clean).detach().requires_grad_()
    with GIM(m, **kw):
        logits = m.run_with_hooks(d.clean, fwd_hooks=[("hook_embed", lambda t, hook: leaf)])
        torch.autograd.grad(d.metric(logits, torch.arange(len(d.clean))).sum(), leaf)


def _gim_hooks(m, d, config=None):
    leaf = m.embed(d.clean).detach().requires_grad_()
    with m.hooks(fwd_hooks=gim_hooks(m, config) + [("hook_embed", lambda t, hook: leaf)]):
        logits = m(d.clean)
    torch.autograd.grad(d.metric(logits, torch.arange(len(d.clean))).sum(), leaf)


def _circuits(fn, graph=None, **fixed):
    """A row call for the circuits functions of signature `(model, graph, clean, corrupted, metric)`."""
    def call(m, d, metric=None, **kw):
        g = d.circuit.copy() if graph is None else graph(d)
        return fn(m, g, d.clean, d.corrupted, metric or d.metric, **{**fixed, **kw})
    return call


_nan = lambda logits, idx: logits[:, -1, 0] * float("nan")  # noqa: E731  (found only after a forward)
_STEPS = {TokenMethod.INTEGRATED_GRADIENTS: dict(steps=2)}
_LAYERWISE = dict(granularity="all", gim=True, steps=2)
_kv = lambda d: d.graph(kv_edges="grouped")  # noqa: E731  (the search methods need grouped KV edges)
_DISCOVER = {"EAP": {}, "EAP-IG-inputs": {}, "EAP-IG-activations": {}, "clean-corrupted": {},
             "edge-pruning": dict(steps=3), "EAP-IG-iterative": dict(rounds=2)}

ROWS = [
    *[Row(f"gimlens.GIM[{arch}]", arch, _gim_context, dict(q_scale="big"), "q_scale", metric=True)
      for arch in ("gpt2", "llama")],
    Row("gimlens.gim_hooks", "llama", _gim_hooks, dict(config={"q_scale": "big"}), "q_scale", metric=True),
    Row("gimlens.explain", "llama", lambda m, d, **kw: gimlens.explain(m, d.clean[0], **kw),
        dict(target_position=50), "outside the sequence"),
    *[Row(f"gimlens.attribute[{method.value}]", arch,
          lambda m, d, method=method, **kw: gimlens.attribute(m, TEXTS, method=method,
                                                              **{**_STEPS.get(method, {}), **kw}),
          dict(max_memory=1024), "max_memory")  # refused by the memory planner, after set-up
      for method, arch in zip(TokenMethod, ["gpt2", "llama"] * 2)],
    Row("gimlens.layerwise_ig", "llama",
        lambda m, d, **kw: gimlens.layerwise_ig(m, TEXTS[1], **{**_LAYERWISE, **kw}), dict(steps=0), "steps"),
    Row("gimlens.evaluate.attribution_faithfulness", "gpt2",
        lambda m, d, **kw: attribution_faithfulness(m, d.attribution, max_k=3, **kw), dict(batch_size=0),
        "batch_size"),
    Row("gimlens.evaluate.ablation_agreement", "llama",
        lambda m, d, **kw: ablation_agreement(m, d.attribution, **kw), dict(batch_size=0), "batch_size"),
    *[Row(f"circuits.attribute[{method.value},{level},{ablation}]", arch,
          _circuits(circuits.attribute, lambda d: d.graph(kv_edges="per_query_head"), method=method,
                    level=level, ablation=ablation, ig_steps=2, gim=True),
          dict(metric=_nan), "NaN", metric=True)
      for method, arch in zip(circuits.Method, ["llama", "gpt2"] * 2)
      for level, ablation in (("edge", "corrupted"), ("node", "mean"), ("neuron", "zero"))],
    *[Row(f"circuits.evaluate[{level}]", "llama", _circuits(circuits.evaluate, level=level),
          dict(ablation="resample"), "expected one of", metric=True) for level in ("edge", "node", "neuron")],
    Row("circuits.faithfulness", "gpt2", _circuits(circuits.faithfulness, ablation="mean"),
        dict(level="graph"), "level", metric=True),
    Row("circuits.faithfulness_curve", "llama", _circuits(circuits.faithfulness_curve, sizes=(10, 100)),
        dict(sizes=(10, 200)), "sizes", metric=True),
    Row("circuits.mib.mib_metrics", "gpt2", _circuits(mib_metrics, fractions=(0.1, 1.0)),
        dict(fractions=(0.5, 2.0)), "fractions", metric=True),
    *[Row(f"circuits.discover[{method}]", "gpt2",
          _circuits(circuits.discover, _kv, n_edges=20, method=method, ig_steps=2, **options),
          dict(n_edges=0), "n_edges", metric=True) for method, options in _DISCOVER.items()],
    Row("circuits.discover[edge-pruning,gim,no warm start]", "llama",
        _circuits(circuits.discover, _kv, n_edges=20, method="edge-pruning", gim=True, steps=3,
                  warm_start=None), dict(lr=-1.0), "lr", metric=True),
    Row("circuits.edge_pruning.edge_pruning", "llama",
        _circuits(edge_pruning, _kv, n_edges=20, steps=3, ig_steps=2), dict(steps=0), "steps", metric=True),
    Row("circuits.iterative.iterative", "llama", _circuits(iterative, _kv, n_edges=20, rounds=2, ig_steps=2),
        dict(rounds=0), "rounds", metric=True),
    Row("circuits.mib.mib_edge_count", "llama", lambda m, d, model=None: mib_edge_count(model or m),
        dict(model="a model"), "TransformerLens model", forward=False),
    Row("circuits.Graph.from_model", "llama", lambda m, d, **kw: Graph.from_model(m, **kw),
        dict(kv_edges="per_key"), "kv_edges", forward=False),
    Row("circuits.tasks.make", "llama", lambda m, d, n=4: make("ioi", m, n=n), dict(n=0), "n",
        forward=False),
    Row("circuits.tasks.Task.kl_metric", "llama",
        lambda m, d, **kw: make("capitals", m, n=3).kl_metric(m, **kw), dict(batch_size=0), "batch_size"),
]
CASES = ["success", "metric_raises", "forward_raises", "bad_input"]


@pytest.fixture
def found(request):
    """The row's model in an unusual state (train mode, a `.grad`, a frozen parameter), put back after."""
    model = request.getfixturevalue(f"{request.param}_model")
    params = list(model.parameters())
    model.train()
    params[0].grad = torch.ones_like(params[0])
    params[-1].requires_grad_(False)
    try:
        yield model
    finally:
        model.eval()
        params[0].grad = None
        params[-1].requires_grad_(True)


class Counter:
    """A callable that counts its calls and raises at call `fail_at` (never when it is None)."""

    def __init__(self, fn=None, fail_at=None):
        self.fn, self.fail_at, self.calls = fn, fail_at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("raised by the caller's code")
        return self.fn(*args, **kwargs) if self.fn else None


def _run(row: Row, model, data: Data, case: str):
    """Runs the case; returns the exception info of a failing run (held by the caller while it
    compares, as a notebook holds the last traceback: hooks that only the garbage collection of
    the failed frames would remove count as left on the model)."""
    if case == "success":
        row.call(model, data)
        return None
    if case == "bad_input":
        with pytest.raises(GimlensError, match=row.match) as raised:
            row.call(model, data, **row.bad)
        return raised
    elif case == "metric_raises":
        counted = Counter(data.metric)
        row.call(model, dataclasses.replace(data, metric=counted))
        failing = Counter(data.metric, fail_at=counted.calls // 2 + 1)
        with pytest.raises(RuntimeError, match="caller's code") as raised:
            row.call(model, dataclasses.replace(data, metric=failing))
        return raised
    else:  # forward_raises: a hook of the caller's own raises inside a forward pass
        name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_pre"
        counted = Counter()
        with model.hooks(fwd_hooks=[(name, counted)]):
            row.call(model, data)
        assert counted.calls, f"{row.name} ran no forward pass: mark its row forward=False"
        failing = Counter(fail_at=counted.calls // 2 + 1)
        with model.hooks(fwd_hooks=[(name, failing)]):
            with pytest.raises(RuntimeError, match="caller's code") as raised:
                row.call(model, data)
        return raised


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("row,found,case", [
    pytest.param(r, r.arch, case, id=f"{r.name}-{case}") for r in ROWS for case in CASES
    if (case != "metric_raises" or r.metric) and (case != "forward_raises" or r.forward)],
    indirect=["found"])
def test_model_left_as_found(row, found, case):
    data = _data(found)
    marker = Counter()
    with found.hooks(fwd_hooks=[("hook_embed", marker)]):  # a hook of the caller's, kept
        before = model_state(found)
        raised = _run(row, found, data, case)  # noqa: F841  (kept alive while comparing)
        assert_state_equal(before, model_state(found))
    assert not any(h.fwd_hooks for h in found.hook_dict.values())
