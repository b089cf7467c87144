"""circuits.attribute against independent references.

The main reference, :func:`edge_reference`, is a per-edge forward written here from the
HuggingFace weights: every destination (each head's q, k, v input, each MLP, the logits) reads its
own sum of source activations, with a coefficient ``alpha[src, dst]`` per edge. Its gradient with
respect to ``alpha`` at 0 *is* edge attribution patching, with GIM's rules inserted as the custom
autograd functions of tests/reference.py.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from circuits._engine.model import ModelSpec, head_outputs
from circuits.attribute import attribute
from circuits.graph import Graph
from conftest import TINY
from gimlens import GimlensError
from gimlens.testing import tiny_hf_model
from reference import Rules, _causal_scores, _layer_norm, _rms_norm, _rope, _scale, _softmax

GIM_RULES = Rules(freeze_norm=True, temperature=2.0, q=0.25, k=0.25, v=0.5, gate=0.5, up=0.5)
PAIRS = [  # (clean, corrupted): the corruption changes the second mention of a name
    ("When Mary and John went to the store, John gave a drink to",
     "When Mary and John went to the store, Paul gave a drink to"),
    ("When Tom and Anna went to the park, Anna gave a ball to",
     "When Tom and Anna went to the park, Lucy gave a ball to"),
    ("When Alice and Bob went to the school, Alice gave a book to",
     "When Alice and Bob went to the school, Emma gave a book to"),
]
ANSWERS = [(" Mary", " John"), (" Tom", " Anna"), (" Bob", " Alice")]


def ioi(model):
    """Clean / corrupted tokens [3, pos] and the logit-difference metric(logits, indices)."""
    clean = model.to_tokens([c for c, _ in PAIRS])
    corrupted = model.to_tokens([c for _, c in PAIRS])
    assert clean.shape == corrupted.shape
    labels = torch.tensor([[model.to_single_token(a) for a in pair] for pair in ANSWERS])

    def metric(logits, idx):
        last = logits[:, -1]
        lab = labels[idx].to(last.device)
        return last.gather(1, lab[:, :1])[:, 0] - last.gather(1, lab[:, 1:])[:, 0]

    return clean, corrupted, metric


# ------------------------------------------------------------------------ the per-edge reference


def _hf_weights(hf):
    """Per-head weights straight from the HF modules (independent of circuits._engine.model)."""
    c = hf.config
    if c.model_type == "gpt2":
        d, H = c.n_embd, c.n_head
        dh, eps = d // H, c.layer_norm_epsilon
        layers = []
        for blk in hf.transformer.h:
            W, b = blk.attn.c_attn.weight, blk.attn.c_attn.bias
            per_head = lambda i: W[:, i * d:(i + 1) * d].reshape(d, H, dh).permute(1, 0, 2)  # noqa: E731
            bias = lambda i: b[i * d:(i + 1) * d].reshape(H, dh)  # noqa: E731
            layers.append(dict(
                norm1=lambda x, f, blk=blk: _layer_norm(x, blk.ln_1.weight, blk.ln_1.bias, eps, f),
                Wq=per_head(0), Wk=per_head(1), Wv=per_head(2), bq=bias(0), bk=bias(1), bv=bias(2),
                Wo=blk.attn.c_proj.weight.reshape(H, dh, d), bo=blk.attn.c_proj.bias,
                mlp=lambda x, r, blk=blk: _gpt2_mlp(blk, x, eps, r)))
        tr = hf.transformer
        return SimpleNamespace(H=H, Hk=H, dh=dh, layers=layers, rope=None,
                               pos=lambda S: tr.wpe.weight[:S],
                               final=lambda x, r: _layer_norm(x, tr.ln_f.weight, tr.ln_f.bias, eps,
                                                              r.freeze_norm) @ hf.lm_head.weight.T)
    d, H, Hk = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    dh, eps = d // H, c.rms_norm_eps
    layers = []
    for layer in hf.model.layers:
        at = layer.self_attn
        heads = lambda m, n: m.weight.reshape(n, dh, d).transpose(1, 2)  # noqa: E731
        bias = lambda m, n: None if m.bias is None else m.bias.reshape(n, dh)  # noqa: E731
        layers.append(dict(
            norm1=lambda x, f, layer=layer: _rms_norm(x, layer.input_layernorm.weight, eps, f),
            Wq=heads(at.q_proj, H), Wk=heads(at.k_proj, Hk), Wv=heads(at.v_proj, Hk),
            bq=bias(at.q_proj, H), bk=bias(at.k_proj, Hk), bv=bias(at.v_proj, Hk),
            Wo=at.o_proj.weight.reshape(d, H, dh).permute(1, 2, 0), bo=None,
            mlp=lambda x, r, layer=layer: _llama_mlp(layer, x, eps, r)))
    theta = c.rope_parameters["rope_theta"]
    return SimpleNamespace(H=H, Hk=Hk, dh=dh, layers=layers, rope=lambda x: _rope(x, theta),
                           pos=lambda S: 0.0,
                           final=lambda x, r: _rms_norm(x, hf.model.norm.weight, eps,
                                                        r.freeze_norm) @ hf.lm_head.weight.T)


def _gpt2_mlp(blk, x, eps, r):
    h = _layer_norm(x, blk.ln_2.weight, blk.ln_2.bias, eps, r.freeze_norm)
    pre = h @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias
    return F.gelu(pre, approximate="tanh") @ blk.mlp.c_proj.weight + blk.mlp.c_proj.bias


def _llama_mlp(layer, x, eps, r):
    h = _rms_norm(x, layer.post_attention_layernorm.weight, eps, r.freeze_norm)
    gate = _scale(F.linear(h, layer.mlp.gate_proj.weight), r.gate)
    up = _scale(F.linear(h, layer.mlp.up_proj.weight), r.up)
    return F.linear(F.silu(gate) * up, layer.mlp.down_proj.weight)


def _project(x, W, b):  # x [n, B, S, d] per head, W [n, d, dh] -> [B, S, n, dh]
    out = torch.einsum("nbsd,ndk->bsnk", x, W)
    return out if b is None else out + b


def edge_reference(hf, emb, alpha, rules=Rules(), *, delta=None, patch_to=None, per_query_kv=False,
                   fixed=None):
    """Logits and source activations of a forward in which destination ``c`` reads
    ``sum_src a[src] + alpha[src, c] * t[src]`` (+ position embedding and attention biases), with
    ``t = delta`` (fixed) or ``t = patch_to - a`` (exact patching at ``alpha = 1``).

    ``alpha`` is ``[n_forward, n_backward]`` in the graph layout; k/v slots per KV head or, with
    ``per_query_kv``, per query head (each head then projects its own k/v input). ``fixed``
    maps forward rows to values that replace those sources' outputs, with no gradient flowing
    through them (EAP-IG's per-node interpolation).
    """
    w = _hf_weights(hf)
    B, S, d = emb.shape
    H, Hk, L = w.H, w.Hk, len(w.layers)
    Hs = H if per_query_kv else Hk
    block = H + 2 * Hs + 1
    acts = [emb]
    const = w.pos(S)
    fixed = {} if fixed is None else fixed

    def fix(start):
        for r in range(start, len(acts)):
            if r in fixed:
                acts[r] = acts[r] * 0 + fixed[r]

    fix(0)

    def inputs(n_up, cols):
        a = torch.stack(acts[:n_up])
        t = delta[:n_up] if patch_to is None else patch_to[:n_up] - a
        return const + a.sum(0) + torch.einsum("nc,nbsd->cbsd", alpha[:n_up, cols], t)

    for l, lw in enumerate(w.layers):
        n_up, base = 1 + l * (H + 1), l * block
        xq = inputs(n_up, base + torch.arange(H))
        xk = inputs(n_up, base + H + torch.arange(Hs))
        xv = inputs(n_up, base + H + Hs + torch.arange(Hs))
        norm = lambda x: lw["norm1"](x, rules.freeze_norm)  # noqa: E731
        kv_of = torch.arange(Hs) // (H // Hk) if per_query_kv else torch.arange(Hk)
        pick = lambda b: None if b is None else b[kv_of]  # noqa: E731
        q = _scale(_project(norm(xq), lw["Wq"], lw["bq"]), rules.q)
        k = _scale(_project(norm(xk), lw["Wk"][kv_of], pick(lw["bk"])), rules.k)
        v = _scale(_project(norm(xv), lw["Wv"][kv_of], pick(lw["bv"])), rules.v)
        if w.rope is not None:
            q, k = w.rope(q), w.rope(k)
        k, v = k.repeat_interleave(H // Hs, dim=2), v.repeat_interleave(H // Hs, dim=2)
        pattern = _softmax(_causal_scores(q.transpose(1, 2), k.transpose(1, 2)), rules.temperature)
        z = (pattern @ v.transpose(1, 2)).transpose(1, 2)
        acts += list(torch.einsum("bshk,hkd->hbsd", z, lw["Wo"]))
        fix(n_up)
        if lw["bo"] is not None:
            const = const + lw["bo"]
        acts.append(lw["mlp"](inputs(n_up + H, [base + block - 1])[0], rules))
        fix(n_up + H)
    logits = w.final(inputs(len(acts), [L * block])[0], rules)
    return logits, torch.stack(acts)


def reference_scores(hf, clean, corrupted, metric, rules=Rules(), *, per_query_kv=False,
                     grad_tokens=None, delta=None):
    """EAP scores: d mean(metric) / d alpha at alpha = 0 (delta = corrupted - clean activations),
    the gradient taken on ``grad_tokens`` (default the clean tokens)."""
    emb = lambda t: hf.get_input_embeddings().weight[t]  # noqa: E731
    g = Graph.from_model(_cfg(hf), kv_edges="per_query_head" if per_query_kv else "grouped")
    zero = torch.zeros(g.n_forward, g.n_backward)
    if delta is None:
        with torch.no_grad():
            _, a_clean = edge_reference(hf, emb(clean), zero, delta=zero[:, :1, None, None])
            _, a_corr = edge_reference(hf, emb(corrupted), zero, delta=zero[:, :1, None, None])
        delta = a_corr - a_clean
    alpha = zero.clone().requires_grad_()
    tokens = clean if grad_tokens is None else grad_tokens
    logits, _ = edge_reference(hf, emb(tokens), alpha, rules, delta=delta, per_query_kv=per_query_kv)
    (grad,) = torch.autograd.grad(metric(logits, torch.arange(len(tokens))).mean(), alpha)
    return grad * g.valid


def _cfg(hf):
    c = hf.config
    if c.model_type == "gpt2":
        return dict(n_layers=c.n_layer, n_heads=c.n_head, d_model=c.n_embd)
    return dict(n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads, d_model=c.hidden_size,
                n_key_value_heads=c.num_key_value_heads)


def _close(actual, expected, rtol=2e-4):
    assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


@pytest.fixture(scope="module")
def hf_models():
    return {name: tiny_hf_model(**{k: v for k, v in kw.items()}) for name, kw in TINY.items()}


# ----------------------------------------------------------------------------- model helpers


def test_head_weights_reproduce_hook_values(any_model):
    spec = ModelSpec.read(any_model)
    clean, _, _ = ioi(any_model)
    _, cache = any_model.run_with_cache(clean)
    for l in range(spec.n_layers):
        attn, w = any_model.blocks[l].attn, spec.attn[l]
        ln = spec.ln1[l].forward(cache[f"blocks.{l}.ln1.hook_in"])
        assert_close(ln, cache[f"blocks.{l}.ln1.hook_out"], atol=1e-5, rtol=1e-5)
        for name, W, b in (("q", w.W_Q, attn.b_Q), ("k", w.W_K, attn.b_K), ("v", w.W_V, attn.b_V)):
            proj = torch.einsum("bsd,hdk->bshk", ln, W) + (0 if b is None else b)
            assert_close(proj, cache[f"blocks.{l}.attn.hook_{name}"], atol=1e-5, rtol=1e-5)
        out = head_outputs(cache[f"blocks.{l}.attn.hook_z"], w.W_O).sum(0)
        b_O = 0 if attn.b_O is None else attn.b_O
        assert_close(out + b_O, cache[f"blocks.{l}.hook_attn_out"], atol=1e-5, rtol=1e-5)


def test_reference_forward_reproduces_the_bridge(any_model, hf_models, request):
    hf = hf_models[request.node.callspec.params["any_model"]]
    clean, _, _ = ioi(any_model)
    g = Graph.from_model(any_model)
    zero = torch.zeros(g.n_forward, g.n_backward)
    with torch.no_grad():
        logits, _ = edge_reference(hf, hf.get_input_embeddings().weight[clean], zero,
                                   delta=zero[:, :1, None, None])
    assert_close(logits, any_model(clean), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------- EAP exactness


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_eap_equals_gradient_of_edge_coefficients(name, hf_models, request):
    model = request.getfixturevalue(f"{name}_model")
    clean, corrupted, metric = ioi(model)
    graph = attribute(model, Graph.from_model(model), clean, corrupted, metric)
    expected = reference_scores(hf_models[name], clean, corrupted, metric)
    assert graph.scores.dtype == torch.float32
    assert float(expected.abs().max()) > 1e-3  # the comparison is not trivially 0 = 0
    _close(graph.scores, expected)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gim_scores_match_reference_under_rules(name, hf_models, request):
    model = request.getfixturevalue(f"{name}_model")
    clean, corrupted, metric = ioi(model)
    plain = attribute(model, Graph.from_model(model), clean, corrupted, metric).scores
    gim = attribute(model, Graph.from_model(model), clean, corrupted, metric, gim=True).scores
    expected = reference_scores(hf_models[name], clean, corrupted, metric, GIM_RULES)
    _close(gim, expected)
    assert (gim - plain).abs().max() > 0.1 * plain.abs().max()  # GIM changes the scores


def test_each_gim_rule_alone_matches_reference(llama_model, hf_models):
    clean, corrupted, metric = ioi(llama_model)
    cases = {"freeze_norm": dict(freeze_norm=True), "softmax_temperature": dict(temperature=2.0),
             "k_scale": dict(k=0.25), "up_scale": dict(up=0.5)}
    off = dict(freeze_norm=False, softmax_temperature=None, q_scale=None, k_scale=None,
               v_scale=None, gate_scale=None, up_scale=None)
    for field, rule in cases.items():
        value = {"freeze_norm": True, "softmax_temperature": 2.0, "k_scale": 0.25, "up_scale": 0.5}
        gim = {**off, field: value[field]}
        scores = attribute(llama_model, Graph.from_model(llama_model), clean, corrupted, metric,
                           gim=gim).scores
        _close(scores, reference_scores(hf_models["llama"], clean, corrupted, metric, Rules(**rule)))


def test_per_query_head_kv_scores_are_exact_and_sum_to_grouped(llama_model, hf_models):
    clean, corrupted, metric = ioi(llama_model)
    for gim, rules in ((None, Rules()), (True, GIM_RULES)):
        per_q = attribute(llama_model, Graph.from_model(llama_model, kv_edges="per_query_head"),
                          clean, corrupted, metric, gim=gim)
        grouped = attribute(llama_model, Graph.from_model(llama_model), clean, corrupted, metric,
                            gim=gim)
        _close(per_q.scores, reference_scores(hf_models["llama"], clean, corrupted, metric, rules,
                                              per_query_kv=True))
        H, Hk = 4, 2
        for l in range(2):
            for qkv in "kv":
                pq = per_q.scores[:, per_q.backward_slice(l, qkv)]
                gr = grouped.scores[:, grouped.backward_slice(l, qkv)]
                _close(pq.reshape(-1, Hk, H // Hk).sum(-1), gr)
            assert not torch.allclose(pq[:, 0], pq[:, 1], atol=1e-6)  # heads of a group differ


def test_split_free_scores_equal_split_mode_scores(any_model):
    """The bridge's split mode (hook_q/k/v_input, hook_result, hook_mlp_in) as the reference."""
    clean, corrupted, metric = ioi(any_model)
    graph = attribute(any_model, Graph.from_model(any_model), clean, corrupted, metric)
    _close(graph.scores, _split_mode_scores(any_model, clean, corrupted, metric))


def _split_mode_scores(model, clean, corrupted, metric):
    cfg, L = model.cfg, model.cfg.n_layers
    flags = (cfg.use_split_qkv_input, cfg.use_attn_result, cfg.use_hook_mlp_in)
    g = Graph.from_model(model)
    try:
        model.set_use_split_qkv_input(True)
        model.set_use_attn_result(True)
        model.set_use_hook_mlp_in(True)
        sources = ["hook_embed"] + [n for l in range(L) for n in
                                    (f"blocks.{l}.attn.hook_result", f"blocks.{l}.hook_mlp_out")]
        dests = [n for l in range(L) for n in (f"blocks.{l}.hook_q_input", f"blocks.{l}.hook_k_input",
                                               f"blocks.{l}.hook_v_input", f"blocks.{l}.hook_mlp_in")]
        dests.append("ln_final.hook_in")

        def acts(tokens, keep):
            store = {}
            names = sources + (dests if keep else [])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                leaf = {}

                def embed(x, hook):
                    leaf["x"] = x.detach().requires_grad_()
                    return leaf["x"]

                logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", embed)] + [
                    (n, lambda x, hook, n=n: _grab_as(store, n, x)) for n in names])
            return logits, store

        _, corr = acts(corrupted, keep=False)
        logits, cl = acts(clean, keep=True)
        grads = torch.autograd.grad(metric(logits, torch.arange(len(clean))).mean(),
                                    [cl[n] for n in dests])
        grads = dict(zip(dests, grads))

        def src_stack(store):  # [n_forward, B, S, d]
            rows = [store["hook_embed"][None]]
            for l in range(L):
                rows += [store[f"blocks.{l}.attn.hook_result"].permute(2, 0, 1, 3),
                         store[f"blocks.{l}.hook_mlp_out"][None]]
            return torch.cat(rows).detach()

        diff = src_stack(corr) - src_stack(cl)
        cols = []
        for l in range(L):
            for n in ("q", "k", "v"):
                cols.append(grads[f"blocks.{l}.hook_{n}_input"].permute(2, 0, 1, 3))
            cols.append(grads[f"blocks.{l}.hook_mlp_in"][None])
        cols.append(grads["ln_final.hook_in"][None])
        dest = torch.cat(cols)
        return torch.einsum("fbsd,cbsd->fc", diff, dest) * g.valid
    finally:
        model.set_use_split_qkv_input(flags[0])
        model.set_use_attn_result(flags[1])
        model.set_use_hook_mlp_in(flags[2])


def _grab_as(store, name, x):
    y = x.view_as(x)
    store[name] = y
    return y


# ---------------------------------------------------------------------------- methods, ablations


def test_ig_inputs_with_one_step_is_eap(llama_model):
    clean, corrupted, metric = ioi(llama_model)
    eap = attribute(llama_model, Graph.from_model(llama_model), clean, corrupted, metric).scores
    for method in ("EAP-IG-inputs", "EAP-IG-activations"):  # the right sum's one point is clean
        ig = attribute(llama_model, Graph.from_model(llama_model), clean, corrupted, metric,
                       method=method, ig_steps=1, quadrature="riemann_right",
                       activations="joint").scores
        assert torch.equal(ig, eap)


LEGENDRE_3 = ([0.5 - 0.15 ** 0.5, 0.5, 0.5 + 0.15 ** 0.5], [5 / 18, 8 / 18, 5 / 18])


@pytest.mark.parametrize("quadrature, alphas, weights", [
    (None, [0, 1 / 3, 2 / 3], [1 / 3] * 3),  # EAP-IG: the corrupted point in, the clean one out
    ("riemann_right", [1 / 3, 2 / 3, 1], [1 / 3] * 3),
    ("gauss_legendre", *LEGENDRE_3),
])
def test_ig_inputs_matches_reference_integral(quadrature, alphas, weights, gpt2_model, hf_models):
    """Weighted sum over alpha of reference gradients at embeddings e_corr + alpha (e_clean - e_corr)."""
    clean, corrupted, metric = ioi(gpt2_model)
    hf = hf_models["gpt2"]
    ig = attribute(gpt2_model, Graph.from_model(gpt2_model), clean, corrupted, metric,
                   method="EAP-IG-inputs", steps=3, quadrature=quadrature).scores
    emb = hf.get_input_embeddings().weight
    expected = 0
    for a, w in zip(alphas, weights):
        wte = (1 - a) * emb[corrupted] + a * emb[clean]
        expected = expected + _reference_at_embeddings(hf, clean, corrupted, wte, metric) * w
    _close(ig, expected)


def test_right_sum_is_eap_ig_plus_the_endpoint_correction(llama_model):
    """right = EAP-IG (left) + 2 (EAP - clean-corrupted) / m (shared/DESIGN.md)."""
    clean, corrupted, metric = ioi(llama_model)
    run = lambda **kw: attribute(llama_model, Graph.from_model(llama_model), clean, corrupted,  # noqa: E731
                                 metric, **kw).scores
    m = 4
    right = run(method="EAP-IG-inputs", steps=m, quadrature="riemann_right")
    left = run(method="EAP-IG-inputs", steps=m)
    eap, cc = run(method="EAP"), run(method="clean-corrupted")
    assert not torch.allclose(right, left, rtol=1e-3, atol=1e-5)
    _close(right, left + 2 * (eap - cc) / m, rtol=1e-4)
    # the same identity on the joint activation path (clean-corrupted's alpha = 0 point is on it);
    # its left sum has no clean point, so it takes the separate clean recording run
    right = run(method="EAP-IG-activations", activations="joint", steps=m, quadrature="riemann_right")
    left = run(method="EAP-IG-activations", activations="joint", steps=m, quadrature="riemann_left")
    _close(right, left + 2 * (eap - cc) / m, rtol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_ig_activations_per_node_matches_reference_loop(name, hf_models, request):
    """EAP-IG's activations rule: for each node group (input, each layer's attention, each MLP)
    and alpha = k/m, k = 1..m, a run in which only that group's output is the fixed value
    a_clean + (1 - alpha)(a_corr - a_clean); the gradients of all runs averaged."""
    model = request.getfixturevalue(f"{name}_model")
    clean, corrupted, metric = ioi(model)
    hf, m = hf_models[name], 2
    got = attribute(model, Graph.from_model(model), clean, corrupted, metric,
                    method="EAP-IG-activations", steps=m).scores
    emb = hf.get_input_embeddings().weight
    g = Graph.from_model(_cfg(hf))
    zero = torch.zeros(g.n_forward, g.n_backward)
    with torch.no_grad():
        _, a_clean = edge_reference(hf, emb[clean], zero, delta=zero[:, :1, None, None])
        _, a_corr = edge_reference(hf, emb[corrupted], zero, delta=zero[:, :1, None, None])
    w = _hf_weights(hf)
    H, L = w.H, len(w.layers)
    groups = [[0]] + [rows for l in range(L) for rows in (
        list(range(1 + l * (H + 1), 1 + l * (H + 1) + H)), [1 + l * (H + 1) + H])]
    expected, runs = 0, 0
    for rows in groups:
        for k in range(1, m + 1):
            a = k / m
            fixed = {r: a_clean[r] + (1 - a) * (a_corr[r] - a_clean[r]) for r in rows}
            alpha = zero.clone().requires_grad_()
            logits, _ = edge_reference(hf, emb[clean], alpha, delta=a_corr - a_clean, fixed=fixed)
            (grad,) = torch.autograd.grad(metric(logits, torch.arange(len(clean))).mean(), alpha)
            expected, runs = expected + grad * g.valid, runs + 1
    _close(got, expected / runs)
    joint = attribute(model, Graph.from_model(model), clean, corrupted, metric,
                      method="EAP-IG-activations", steps=m, activations="joint").scores
    assert not torch.allclose(joint, got, rtol=1e-2, atol=1e-4)


def _reference_at_embeddings(hf, clean, corrupted, embeds, metric):
    emb = hf.get_input_embeddings().weight
    g = Graph.from_model(_cfg(hf))
    zero = torch.zeros(g.n_forward, g.n_backward)
    with torch.no_grad():
        _, a_clean = edge_reference(hf, emb[clean], zero, delta=zero[:, :1, None, None])
        _, a_corr = edge_reference(hf, emb[corrupted], zero, delta=zero[:, :1, None, None])
    alpha = zero.clone().requires_grad_()
    logits, _ = edge_reference(hf, embeds, alpha, delta=a_corr - a_clean)
    (grad,) = torch.autograd.grad(metric(logits, torch.arange(len(clean))).mean(), alpha)
    return grad * g.valid


def test_ig_completeness_input_and_logit_edges(llama_model):
    """Integrated gradients along a straight path add up to the metric difference: over the edges
    out of ``input`` for EAP-IG-inputs, over the edges into ``logits`` for EAP-IG-activations
    (their destination inputs move on straight lines). EAP alone is visibly off."""
    clean, corrupted, metric = ioi(llama_model)
    idx = torch.arange(len(clean))
    with torch.no_grad():
        delta = float(metric(llama_model(corrupted), idx).mean() - metric(llama_model(clean), idx).mean())
    logits_col = -1
    sums = {}
    for method, steps in (("EAP", 1), ("EAP-IG-inputs", 64), ("EAP-IG-activations", 64)):
        g = attribute(llama_model, Graph.from_model(llama_model), clean, corrupted, metric,
                      method=method, ig_steps=steps, activations="joint")
        s = g.scores
        sums[method] = (float(s[0].sum()), float(s[:, logits_col].sum()))
        assert g.completeness.input_edges == pytest.approx(sums[method][0])
        assert g.completeness.metric_change == pytest.approx(delta, rel=1e-5)
        if method == "EAP-IG-inputs":
            assert g.completeness.relative_error < 0.03
    assert abs(sums["EAP-IG-inputs"][0] - delta) < 0.03 * abs(delta)
    assert abs(sums["EAP-IG-activations"][1] - delta) < 0.03 * abs(delta)
    assert abs(sums["EAP"][0] - delta) > 0.1 * abs(delta)


def test_eap_input_edges_sum_to_embedding_gradient_times_difference(qwen2_model):
    """sum over destinations of input's EAP scores = (e_corr - e_clean) . d metric / d e."""
    clean, corrupted, metric = ioi(qwen2_model)
    s = attribute(qwen2_model, Graph.from_model(qwen2_model), clean, corrupted, metric).scores
    e_clean, e_corr = qwen2_model.embed(clean).detach(), qwen2_model.embed(corrupted).detach()
    leaf = e_clean.clone().requires_grad_()
    logits = qwen2_model.run_with_hooks(clean, fwd_hooks=[("hook_embed", lambda x, hook: leaf)])
    (grad,) = torch.autograd.grad(metric(logits, torch.arange(len(clean))).mean(), leaf)
    assert_close(s[0].sum(), ((e_corr - e_clean) * grad).sum(), rtol=1e-4, atol=1e-6)


def test_clean_corrupted_averages_clean_and_corrupted_gradients(llama_model, hf_models):
    clean, corrupted, metric = ioi(llama_model)
    got = attribute(llama_model, Graph.from_model(llama_model), clean, corrupted, metric,
                    method="clean-corrupted").scores
    hf = hf_models["llama"]
    expected = 0.5 * (reference_scores(hf, clean, corrupted, metric)
                      + reference_scores(hf, clean, corrupted, metric, grad_tokens=corrupted))
    _close(got, expected)


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_mean_and_zero_ablation_use_their_activation_difference(ablation, gpt2_model, hf_models):
    clean, corrupted, metric = ioi(gpt2_model)
    got = attribute(gpt2_model, Graph.from_model(gpt2_model), clean, corrupted, metric,
                    ablation=ablation).scores
    hf = hf_models["gpt2"]
    g = Graph.from_model(gpt2_model)
    zero = torch.zeros(g.n_forward, g.n_backward)
    emb = hf.get_input_embeddings().weight
    with torch.no_grad():
        _, a_clean = edge_reference(hf, emb[clean], zero, delta=zero[:, :1, None, None])
        _, a_corr = edge_reference(hf, emb[corrupted], zero, delta=zero[:, :1, None, None])
    ablated = a_corr.mean(1, keepdim=True) if ablation == "mean" else torch.zeros_like(a_corr)
    expected = reference_scores(hf, clean, corrupted, metric, delta=ablated - a_clean)
    _close(got, expected)


def test_batching_and_task_objects_give_the_same_scores(llama_model):
    clean, corrupted, metric = ioi(llama_model)
    whole = attribute(llama_model, Graph.from_model(llama_model), clean, corrupted, metric).scores
    batched = attribute(llama_model, Graph.from_model(llama_model), clean, corrupted, metric,
                        batch_size=2).scores
    task = SimpleNamespace(clean=clean, corrupted=corrupted, metric=metric)
    tasked = attribute(llama_model, Graph.from_model(llama_model), task, batch_size=1).scores
    _close(batched, whole, rtol=1e-5)
    _close(tasked, whole, rtol=1e-5)


def test_padding_with_attention_mask_matches_unpadded_scores(gpt2_model):
    clean, corrupted, metric = ioi(gpt2_model)
    pad = torch.zeros(len(clean), 3, dtype=clean.dtype)
    mask = torch.cat([torch.ones_like(clean), torch.zeros_like(pad)], 1)

    def padded_metric(logits, idx):
        return metric(logits[:, : clean.shape[1]], idx)

    plain = attribute(gpt2_model, Graph.from_model(gpt2_model), clean, corrupted, metric).scores
    padded = attribute(gpt2_model, Graph.from_model(gpt2_model), torch.cat([clean, pad], 1),
                       torch.cat([corrupted, pad], 1), padded_metric, attention_mask=mask).scores
    _close(padded, plain, rtol=1e-5)


# ------------------------------------------------------------------------------------ bad input


def _bad_cases(model):
    clean, corrupted, metric = ioi(model)
    g = Graph.from_model(model)
    return {
        "shape": (dict(clean=clean, corrupted=corrupted[:, :-1]), "same shape"),
        "float tokens": (dict(clean=clean.float(), corrupted=corrupted), "integer token ids"),
        "token range": (dict(clean=clean + 10_000, corrupted=corrupted), "outside the vocabulary"),
        "method": (dict(method="EAP-XL"), "unknown method 'EAP-XL'; expected one of 'EAP', 'EAP-IG-inputs'"),
        "ablation": (dict(ablation="resample"), "expected one of 'corrupted', 'mean', 'zero'"),
        "steps and ig_steps": (dict(steps=2, ig_steps=2), "not both"),
        "quadrature": (dict(method="EAP-IG-inputs", quadrature="simpson"), "unknown quadrature rule"),
        "metric arity": (dict(metric=lambda: 0.0), "metric must be callable as"),
        "activations": (dict(method="EAP-IG-activations", activations="each"), "unknown activations"),
        "ig_steps": (dict(ig_steps=0), "ig_steps"),
        "batch_size": (dict(batch_size=0), "batch_size"),
        "metric shape": (dict(metric=lambda lg, idx: lg[:, -1, :2]), "shape \\[3\\]"),
        "metric nan": (dict(metric=lambda lg, idx: lg[:, -1, 0] * float("nan")), "NaN"),
        "metric constant": (dict(metric=lambda lg, idx: torch.zeros(len(idx))), "differentiable"),
        "graph model": (dict(graph=Graph(n_layers=2, n_heads=4, d_model=32)), "does not match"),
        "graph type": (dict(graph="graph"), "circuits.Graph"),
        "gim": (dict(gim=dict(q_scale="big")), "q_scale"),
        "mask": (dict(attention_mask=torch.ones(2, 2)), "attention_mask"),
    }, dict(graph=g, clean=clean, corrupted=corrupted, metric=metric)


BAD_CASES = ["shape", "float tokens", "token range", "method", "ablation", "ig_steps",
             "steps and ig_steps", "quadrature", "metric arity", "activations", "batch_size",
             "metric shape", "metric nan", "metric constant", "graph model", "graph type", "gim", "mask"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_gimlens_error_and_leaves_model(case, llama_model):
    cases, good = _bad_cases(llama_model)
    override, message = cases[case]
    kwargs = {**good, **override}
    with pytest.raises(GimlensError, match=message):
        attribute(llama_model, kwargs.pop("graph"), kwargs.pop("clean"), kwargs.pop("corrupted"),
                  kwargs.pop("metric"), **kwargs)


def test_model_without_needed_hooks_is_rejected(llama_model):
    clean, corrupted, metric = ioi(llama_model)

    class NoHooks(torch.nn.Module):
        cfg = llama_model.cfg
        hook_dict = {"hook_embed": None}

        def hooks(self, *a, **k):
            raise AssertionError("must not be used")

    with pytest.raises(GimlensError, match="lacks hook points.*ln1.hook_in"):
        attribute(NoHooks(), Graph.from_model(llama_model), clean, corrupted, metric)
    with pytest.raises(GimlensError, match="TransformerLens model"):
        attribute(torch.nn.Linear(2, 2), Graph.from_model(llama_model), clean, corrupted, metric)


@pytest.mark.slow
def test_real_model_split_free_scores_equal_split_mode_scores(smollm2):
    """Split mode's per-head inputs and `hook_result` outputs are the reference on a pre-norm
    model (SmolLM2); on a post-norm model (Gemma 3) a head's output is its share after the
    post-norm, which `hook_result` does not show: see the next test."""
    from circuits.tasks import make

    model = smollm2
    task = make("ioi", model, n=3, seed=1)
    graph = attribute(model, Graph.from_model(model), task)
    expected = _split_mode_scores(model, task.clean, task.corrupted, task.metric)
    assert float(expected.abs().max()) > 1e-3
    _close(graph.scores, expected, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("gim", [False, True])
def test_real_model_eap_scores_are_the_derivative_of_the_patched_metric(real_model, gim):
    """On each real model (Gemma 3 has post-norms, a `1 + w` RMSNorm and soft-capped logits):
    the EAP score of every edge equals d mean(metric) / d (edge's missing coefficient) at the
    full circuit, by autograd through the exact patching forward."""
    from circuits._engine.masked import patched_metric
    from circuits.run import Run
    from circuits.tasks import make
    from gimlens.runtime import prepared

    model = real_model
    task = make("ioi", model, n=2, seed=3)
    graph = Graph.from_model(model)
    eap = attribute(model, graph.copy(), task, method="EAP", gim=gim).scores
    with prepared(model):
        run = Run.build(model, graph, task, gim=gim, keep_sources=True)
        w = torch.zeros(graph.n_forward, graph.n_backward, requires_grad=True)
        with torch.enable_grad():
            total = sum(patched_metric(run, i, w)[0].sum() for i in range(len(run.batches)))
            (grad,) = torch.autograd.grad(total, w)
    valid = graph.valid
    assert float(eap[valid].abs().max()) > 1e-2
    _close(grad[valid] / len(task), eap[valid], rtol=1e-3)
