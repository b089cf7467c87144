"""Every model family, exact: one row per family of `gimlens.testing.FAMILIES`.

Each row checks, on a tiny random model of the family, against an independent reference: the
bridge's logits equal HuggingFace's; with every GIM rule off gradients equal plain autograd on
the HuggingFace model; each GIM rule changes the gradient where the family has its component
(and is reported as not applicable where it has none), and freezing each kind of norm it has
(pre, post, q/k) alone changes the gradient; `explain` runs; the empty circuit reproduces the
corrupted run and the full circuit the clean run (edge, node and neuron level); a node-level
circuit equals replacing the nodes' outputs by hand, and a missing MLP input edge equals
patching the MLP input by hand; the derivative of the patched metric with respect to the edge
coefficients at the full circuit equals the EAP scores (with and without GIM); node scores
equal plain autograd at each node's output (what it adds to the residual stream);
clean-corrupted is the mean of EAP from both ends; every method keeps node and neuron scores
the sums of edge scores; the faithfulness curve, edge pruning and the iterative search run and
leave the model as found. A family added to `FAMILIES` gets all of this by itself.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch.testing import assert_close

from circuits._engine.masked import patched_metric
from circuits.run import Run
from circuits.attribute import Method, attribute
from circuits.discover import discover
from circuits.evaluate import evaluate, faithfulness_curve
from circuits.graph import Graph
from gimlens.attribution import explain
from gimlens.gim import GIM, RULES, GIMConfig, gim_hooks, unhooked_norms
from gimlens.gim_report import gim_report
from gimlens.rules import freeze
from gimlens.runtime import prepared, run_hooked
from gimlens.testing import FAMILIES, tiny_hf_model, tiny_model
from helpers import assert_state_equal, model_state
from test_attribute import ioi

ARGS = dict(scale=3.0, seed=5)

#: Rules whose component a family lacks (gate/up: plain MLP; softmax: the bridge's attention
#: of GPT-J and OPT fires no hook_attn_scores / hook_pattern).
NOT_APPLICABLE = {
    "gpt2": {"gate_scale", "up_scale"},
    "gpt_neox": {"gate_scale", "up_scale"},
    "gptj": {"gate_scale", "up_scale", "softmax_temperature"},
    "phi": {"gate_scale", "up_scale"},
    "opt": {"gate_scale", "up_scale", "softmax_temperature"},
}

ROWS = sorted(FAMILIES)


@functools.lru_cache(maxsize=None)
def _models(family: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(family, **ARGS)
        model(model.to_tokens("When Mary and John went to the store"))  # the bridge's own hooks
    return model, tiny_hf_model(family, **ARGS)


def _grad_at_embed(model, tokens, metric, config, extra=()) -> torch.Tensor:
    leaf = {}

    def embed(x, hook):
        leaf["x"] = x.detach().requires_grad_(True)
        return leaf["x"]

    with torch.enable_grad(), GIM(model, config), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bridge's RMSNorm rebuild when hook_scale is hooked
        logits = run_hooked(model, tokens, fwd_hooks=[("hook_embed", embed), *extra])
        (grad,) = torch.autograd.grad(metric(logits, torch.arange(len(tokens))).sum(), leaf["x"])
    return grad


@pytest.mark.parametrize("family", ROWS)
def test_bridge_logits_equal_huggingface(family):
    model, hf = _models(family)
    tokens, _, _ = ioi(model)
    with torch.no_grad():
        assert_close(run_hooked(model, tokens), hf(tokens).logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ROWS)
def test_gradients_with_every_gim_rule_off_equal_plain_autograd_on_huggingface(family):
    model, hf = _models(family)
    tokens, _, metric = ioi(model)
    grad = _grad_at_embed(model, tokens, metric, GIMConfig.off())
    with torch.enable_grad():
        emb = hf.get_input_embeddings()(tokens).detach().requires_grad_(True)
        logits = hf(inputs_embeds=emb).logits
        (ref,) = torch.autograd.grad(metric(logits, torch.arange(len(tokens))).sum(), emb)
    assert_close(grad, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ROWS)
def test_each_gim_rule_changes_the_gradient_where_its_component_exists(family):
    model, _ = _models(family)
    tokens, _, metric = ioi(model)
    plain = _grad_at_embed(model, tokens, metric, GIMConfig.off())
    absent = NOT_APPLICABLE.get(family, set())
    report = gim_report(model)
    assert unhooked_norms(model) == []  # every norm has a hook_scale the freeze reaches
    for rule in RULES:
        only = GIMConfig.off().with_overrides(**{rule.field: rule.default})
        grad = _grad_at_embed(model, tokens, metric, only)
        if rule.field in absent:
            assert report[rule.field].startswith("not applicable"), (rule.field, report)
            assert torch.equal(grad, plain), rule.field
        else:
            assert report[rule.field].startswith("acts at"), (rule.field, report)
            assert (grad - plain).abs().max() > 1e-4 * plain.abs().max(), rule.field


@pytest.mark.parametrize("family", ROWS)
def test_explain_runs_with_gim_on_every_family(family):
    model, _ = _models(family)
    tokens, _, _ = ioi(model)
    scores = explain(model, tokens)
    assert tuple(scores.shape) == tuple(tokens.shape) and bool(torch.isfinite(scores).all())


def _store(seen):
    def metric(logits, idx):
        seen.append(logits.detach())
        return logits[:, -1, 0]
    return metric


def _circuit(model, level: str, full: bool) -> Graph:
    g = Graph.from_model(model)
    if level == "edge":
        g.in_graph = g.valid.clone() if full else torch.zeros_like(g.valid)
    elif level == "node":
        g.nodes_in_graph = torch.full((g.n_forward,), full)
    else:
        g.neurons_in_graph = torch.full((g.n_forward, model.cfg.d_model), full)
    return g


@pytest.mark.parametrize("level", ["edge", "node", "neuron"])
@pytest.mark.parametrize("family", ROWS)
def test_empty_circuit_is_the_corrupted_run_and_full_circuit_the_clean_run(family, level):
    model, _ = _models(family)
    clean, corrupted, _ = ioi(model)
    want = {False: run_hooked(model, corrupted), True: run_hooked(model, clean)}
    assert not torch.allclose(want[False], want[True], atol=1e-3)
    for full in (False, True):
        seen = []
        evaluate(model, _circuit(model, level, full), clean, corrupted, _store(seen), level=level)
        assert_close(seen[0], want[full], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("gim", [False, True])
@pytest.mark.parametrize("family", ROWS)
def test_derivative_of_the_patched_metric_in_the_edge_coefficients_equals_eap(family, gim):
    model, _ = _models(family)
    clean, corrupted, metric = ioi(model)
    graph = Graph.from_model(model)
    eap = attribute(model, graph.copy(), clean, corrupted, metric, method="EAP", gim=gim).scores
    with prepared(model):
        run = Run.build(model, graph, clean, corrupted, metric, gim=gim, keep_sources=True)
        w = torch.zeros(graph.n_forward, graph.n_backward, requires_grad=True)
        with torch.enable_grad():
            total = sum(patched_metric(run, i, w)[0].sum() for i in range(len(run.batches)))
            (grad,) = torch.autograd.grad(total, w)
    valid = graph.valid
    assert eap[valid].abs().max() > 1e-3
    assert_close(grad[valid] / len(clean), eap[valid], atol=2e-5, rtol=1e-3)


def _node_outputs(model, tokens, leaf: bool):
    """`(embed, [per-head outputs [H, B, S, d]], [mlp out], [attention out], logits)`: each
    node's output as added to the residual stream, computed here from `hook_z`, `W_O` and (on a
    post-norm family) the HF post-attention norm module; with `leaf` the embedding is a leaf and
    the attention and MLP outputs keep their gradients."""
    got = {"z": {}, "raw": {}, "attn": {}, "mlp": {}}
    L = model.cfg.n_layers

    def embed(x, hook):
        got["embed"] = x.detach().requires_grad_(leaf)
        return got["embed"]

    def keep(kind, l):
        def fn(x, hook):
            if leaf and kind in ("attn", "mlp"):
                x = x.clone()
                x.retain_grad()
            got[kind][l] = x
            return x
        return fn

    hooks = [("hook_embed", embed)]
    for l in range(L):
        hooks += [(f"blocks.{l}.attn.hook_z", keep("z", l)),
                  (f"blocks.{l}.hook_attn_out", keep("attn", l)),
                  (f"blocks.{l}.hook_mlp_out", keep("mlp", l))]
        if f"blocks.{l}.ln1_post.hook_in" in model.hook_dict:
            hooks.append((f"blocks.{l}.ln1_post.hook_in", keep("raw", l)))
    logits = run_hooked(model, tokens, fwd_hooks=hooks)
    heads = []
    for l in range(L):
        W_O = model.blocks[l].attn.W_O.detach()
        out = torch.einsum("bshe,hed->hbsd", got["z"][l].detach(), W_O)
        if l in got["raw"]:  # a post-norm family: each head's share of the normalised output
            norm = model.blocks[l].ln1_post.original_component
            gain = norm.weight.detach() + (1.0 if "Gemma" in type(norm).__name__ else 0.0)
            raw = got["raw"][l].detach()
            eps = getattr(norm, "eps", None) or norm.variance_epsilon
            out = out * torch.rsqrt(raw.pow(2).mean(-1, keepdim=True) + eps) * gain
        heads.append(out)
    return got["embed"], heads, got["mlp"], got["attn"], logits


@pytest.mark.parametrize("family", ROWS)
def test_node_scores_equal_autograd_at_each_node_output(family):
    model, _ = _models(family)
    clean, corrupted, metric = ioi(model)
    n = len(clean)
    g = attribute(model, Graph.from_model(model), clean, corrupted, metric, level="node")
    with torch.no_grad():
        e_c, h_c, m_c, _, _ = _node_outputs(model, corrupted, leaf=False)
    with torch.enable_grad():
        e, h, m, attn, logits = _node_outputs(model, clean, leaf=True)
        metric(logits, torch.arange(n)).sum().backward()
    ref = [((e_c - e) * e.grad).sum()]
    for l in range(model.cfg.n_layers):
        # every head's output joins the residual stream where the attention output does
        ref += list(((h_c[l] - h[l]) * attn[l].grad).sum((1, 2, 3)))
        ref.append(((m_c[l] - m[l]) * m[l].grad).sum())
    ref = torch.stack([r.detach().float() for r in ref]) / n
    assert_close(g.node_scores, ref, atol=2e-5, rtol=1e-4)


def _share(model, l, z, raw):
    """Each head's output `[H, B, S, d]` as added to the residual stream (see `_node_outputs`)."""
    out = torch.einsum("bshe,hed->hbsd", z.detach(), model.blocks[l].attn.W_O.detach())
    if raw is not None:
        norm = model.blocks[l].ln1_post.original_component
        gain = norm.weight.detach() + (1.0 if "Gemma" in type(norm).__name__ else 0.0)
        eps = getattr(norm, "eps", None) or norm.variance_epsilon
        out = out * torch.rsqrt(raw.detach().pow(2).mean(-1, keepdim=True) + eps) * gain
    return out


@pytest.mark.parametrize("ablation", ["corrupted", "mean", "zero"])
@pytest.mark.parametrize("family", ROWS)
def test_node_level_circuit_equals_replacing_the_nodes_outputs_by_hand(family, ablation):
    # ablating a node replaces what it adds to the residual stream by its corrupted value (or
    # its mean over the corrupted examples, or zero)
    model, _ = _models(family)
    clean, corrupted, _ = ioi(model)
    g = Graph.from_model(model)
    out = [g.forward_index(0, 1), g.forward_index(1, 0), g.forward_index(0)]  # a0.h1, a1.h0, m0
    g.nodes_in_graph[out] = False
    seen = []
    evaluate(model, g, clean, corrupted, _store(seen), level="node", ablation=ablation)
    with torch.no_grad():
        _, h_c, m_c, _, _ = _node_outputs(model, corrupted, leaf=False)
    if ablation != "corrupted":  # the prompts have no padding: a plain mean over examples
        h_c = [x.mean(1, keepdim=True) * (ablation == "mean") for x in h_c]
        m_c = {l: x.mean(0, keepdim=True) * (ablation == "mean") for l, x in m_c.items()}
    post = f"blocks.0.ln1_post.hook_in" in model.hook_dict
    run = {}

    def keep(name):
        def fn(x, hook):
            run[name] = x
        return fn

    def heads(l, h):
        def fn(x, hook):
            mine = _share(model, l, run["z", l], run.get(("raw", l)))[h]
            return x + (h_c[l][h] - mine).to(x.dtype)
        return fn

    hooks = []
    for l, h in ((0, 1), (1, 0)):
        hooks.append((f"blocks.{l}.attn.hook_z", keep(("z", l))))
        if post:
            hooks.append((f"blocks.{l}.ln1_post.hook_in", keep(("raw", l))))
        hooks.append((f"blocks.{l}.hook_attn_out", heads(l, h)))
    hooks.append(("blocks.0.hook_mlp_out", lambda x, hook: m_c[0].expand_as(x)))
    with torch.no_grad():
        ref = run_hooked(model, clean, fwd_hooks=hooks)
    assert_close(seen[0], ref, atol=5e-5, rtol=1e-4)
    assert not torch.allclose(ref, run_hooked(model, clean), atol=1e-3)  # the patch did something


@pytest.mark.parametrize("family", ROWS)
def test_every_method_keeps_node_and_neuron_scores_the_sums_of_edge_scores(family):
    # residual additivity: a node's output feeds every destination, so its gradient is the sum
    # of theirs, through post-norm shares and shared norms alike
    model, _ = _models(family)
    clean, corrupted, metric = ioi(model)
    for method in Method:
        g = attribute(model, Graph.from_model(model), clean, corrupted, metric, method=method,
                      steps=2, level="neuron", gim=True)
        assert bool(torch.isfinite(g.scores[g.valid]).all()), method
        assert_close(g.node_scores, g.scores.sum(1), atol=1e-6, rtol=1e-4)
        assert_close(g.neuron_scores.sum(1), g.node_scores, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ROWS)
def test_faithfulness_curve_and_the_search_methods_run_and_leave_the_model_as_found(family):
    model, _ = _models(family)
    clean, corrupted, metric = ioi(model)
    before = model_state(model)
    g = attribute(model, Graph.from_model(model), clean, corrupted, metric)
    curve = faithfulness_curve(model, g, clean, corrupted, metric, sizes=(0, 50, 100))
    assert curve.faithfulness[0] == pytest.approx(0.0, abs=1e-4)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)
    for method, options in (("edge-pruning", dict(steps=3)), ("EAP-IG-iterative", dict(rounds=2))):
        found = discover(model, Graph.from_model(model), clean, corrupted, metric, n_edges=20,
                         method=method, ig_steps=2, gim=True, **options)
        assert 0 < found.n_edges_in_graph <= 20, method
    assert_state_equal(before, model_state(model))


@pytest.mark.parametrize("family", ROWS)
def test_the_norm_freeze_acts_on_every_kind_of_norm_the_family_has(family):
    # pre-norms, post-norms (Gemma 2/3, OLMo-2), q/k norms (Qwen3, Gemma 3, OLMo-2): freezing the
    # scales of one kind alone changes the gradient, so none of their hooks is a dead end
    model, _ = _models(family)
    tokens, _, metric = ioi(model)
    plain = _grad_at_embed(model, tokens, metric, GIMConfig.off())
    scales = [n for n in model.hook_dict if n.endswith(".hook_scale") and n.startswith("blocks.")]
    kinds = {"pre": (".ln1.", ".ln2."), "post": ("_post.",), "qk": ("q_norm.", "k_norm.")}
    found = 0
    for kind, marks in kinds.items():
        names = [n for n in scales if any(m in n for m in marks)]
        if not names:
            continue
        found += 1
        hooks = [(n, lambda t, hook: freeze(t)) for n in names]
        grad = _grad_at_embed(model, tokens, metric, GIMConfig.off(), hooks)
        assert (grad - plain).abs().max() > 1e-5 * plain.abs().max(), kind
    assert found >= 1


@pytest.mark.parametrize("family", ROWS)
def test_a_missing_mlp_input_edge_equals_patching_the_mlp_input_by_hand(family):
    # edge input -> m1 left out: the MLP of layer 1 reads its own copy of the residual stream
    # with the token embedding's difference removed, through the family's own norm module
    model, _ = _models(family)
    clean, corrupted, _ = ioi(model)
    g = Graph.from_model(model)
    g.in_graph = g.valid.clone()
    g.in_graph[0, g.backward_index(1)] = False
    seen = []
    evaluate(model, g, clean, corrupted, _store(seen))
    keep = _Keep()
    with torch.no_grad():
        run_hooked(model, corrupted, fwd_hooks=[("hook_embed", keep)])
    e_c, run = keep.x, {}

    def embed(x, hook):
        run["delta"] = x - e_c
    hooks = [("hook_embed", embed)]
    if "blocks.1.ln2.hook_in" in model.hook_dict:  # the MLP's own norm input
        hooks.append(("blocks.1.ln2.hook_in", lambda x, hook: x - run["delta"]))
    elif "blocks.1.ln1.hook_in" in model.hook_dict:  # parallel block on one norm: through ln1
        norm = model.blocks[1].ln1.original_component
        hooks.append(("blocks.1.ln1.hook_in", lambda x, hook: run.__setitem__("x", x)))
        hooks.append(("blocks.1.mlp.hook_in", lambda x, hook: norm(run["x"] - run["delta"])))
    else:  # no pre-norm: the MLP reads the residual stream
        hooks.append(("blocks.1.mlp.hook_in", lambda x, hook: x - run["delta"]))
    with torch.no_grad():
        ref = run_hooked(model, clean, fwd_hooks=hooks)
    assert_close(seen[0], ref, atol=5e-5, rtol=1e-4)
    assert not torch.allclose(ref, run_hooked(model, clean), atol=1e-4)  # the patch did something


class _Keep:
    """A forward hook that keeps the value it sees."""

    def __call__(self, x, hook):
        self.x = x.detach()


def test_norms_without_a_hook_scale_are_reported_and_warned_about_not_skipped():
    # StableLM with qk_layernorm: the bridge runs its per-head q/k LayerNorms without hook_scale
    import transformers
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    keywords = FAMILIES["stablelm"][2](32, 4, 2, 64, 2)
    hf = transformers.StableLmForCausalLM(transformers.StableLmConfig(**keywords, qk_layernorm=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_bridge_from_module(hf.eval(), "StableLmForCausalLM", hf_config=hf.config)
    unreached = unhooked_norms(model)
    assert unreached and all("q_layernorm" in n or "k_layernorm" in n for n in unreached)
    with pytest.warns(UserWarning):  # 2 layers x (4 query + 2 key heads)
        assert "cannot reach 12 norm module(s)" in gim_report(model)["freeze_norm"]
    with pytest.warns(UserWarning, match="freeze_norm cannot reach 12 norm"):
        gim_hooks(model)


@pytest.mark.parametrize("family", ROWS)
def test_clean_corrupted_is_the_mean_of_eap_from_both_ends(family):
    # its second gradient pass sets every destination input to its ablated value: the corrupted
    # run, so with corrupted ablation CC(clean, corrupted) = (EAP(clean, corrupted) - EAP(corrupted, clean)) / 2
    model, _ = _models(family)
    clean, corrupted, metric = ioi(model)
    score = lambda a, b, method: attribute(model, Graph.from_model(model), a, b, metric,  # noqa: E731
                                           method=method).scores
    cc = score(clean, corrupted, "clean-corrupted")
    ref = (score(clean, corrupted, "EAP") - score(corrupted, clean, "EAP")) / 2
    valid = Graph.from_model(model).valid
    assert_close(cc[valid], ref[valid], atol=2e-5, rtol=1e-3)


def test_an_unknown_family_is_a_gimlens_error_naming_the_families():
    from gimlens import GimlensError

    with pytest.raises(GimlensError, match="unknown tiny architecture 'bert'.*'gemma2'"):
        tiny_model("bert")


@pytest.mark.parametrize("family", ROWS)
def test_per_query_head_kv_scores_add_up_to_the_grouped_ones(family):
    # MIB's layout: one k/v edge per query head; the heads of a KV group share its projection
    model, _ = _models(family)
    clean, corrupted, metric = ioi(model)
    grouped = attribute(model, Graph.from_model(model), clean, corrupted, metric)
    split = attribute(model, Graph.from_model(model, kv_edges="per_query_head"), clean, corrupted,
                      metric)
    H = model.cfg.n_heads
    Hk = model.cfg.n_key_value_heads or H
    for l in range(model.cfg.n_layers):
        for p in "qkv":
            a = grouped.scores[:, grouped.backward_slice(l, p)]
            b = split.scores[:, split.backward_slice(l, p)]
            if p != "q":
                b = b.reshape(b.shape[0], Hk, H // Hk).sum(-1)
            assert_close(b, a, atol=1e-6, rtol=1e-4)
