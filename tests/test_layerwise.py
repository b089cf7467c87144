"""Layer-wise IG (gimlens.layerwise) against hand-derived values and an independent block reference.

The reference re-implements one decoder block from the HuggingFace weights in plain PyTorch
(float64, GIM's rules from tests/reference.py) and integrates with an explicit Gauss-Legendre loop,
one target at a time, so batching, chunking, hook plumbing and the per-head outputs are all
checked against code that shares none of them.
"""

from __future__ import annotations

import json
import os
import warnings

import matplotlib.image
import numpy as np
import pytest
import torch

from conftest import TINY
from gimlens import GIMConfig, GimlensError
from gimlens.layerwise import Baseline, Granularity, LayerwiseResult, layerwise_ig
from gimlens.testing import tiny_hf_model, tiny_model, tiny_tokenizer
from helpers import assert_state_equal, model_state
from reference import Rules, _causal_scores, _layer_norm, _rms_norm, _rope, _scale, _softmax

PROMPT = "When Mary and John went to the store"
GIM_RULES = Rules(freeze_norm=True, temperature=2.0, q=0.25, k=0.25, v=0.5, gate=0.5, up=0.5)


@pytest.fixture(scope="module")
def hf_models():
    return {name: tiny_hf_model(**kw).double() for name, kw in TINY.items()}


def _arch(model) -> str:
    names = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
    return names[model.cfg.architecture]


def _clean(model, l: int):
    tokens = model.to_tokens(PROMPT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, cache = model.run_with_cache(tokens)
    return tokens, {k: cache[f"blocks.{l}.{k}"][0].double() for k in ("hook_resid_pre", "hook_resid_mid")}, cache


# ---------------------------------------------------------------------------------------------
# An independent block (attention per head, MLP) in plain PyTorch


def _ref_attention(hf, l, x, r: Rules):
    """Per-head outputs ``[B, S, H, d]`` (z_h @ W_O[h]) of block ``l``'s attention."""
    B, S, d = x.shape
    if hf.config.model_type == "gpt2":
        blk, H = hf.transformer.h[l], hf.config.n_head
        dh = d // H
        h = _layer_norm(x, blk.ln_1.weight, blk.ln_1.bias, hf.config.layer_norm_epsilon, r.freeze_norm)
        qkv = h @ blk.attn.c_attn.weight + blk.attn.c_attn.bias
        q, k, v = (t.reshape(B, S, H, dh) for t in qkv.split(d, dim=-1))
        w_o = blk.attn.c_proj.weight.reshape(H, dh, d)
        rep = 1
    else:
        cfg, layer = hf.config, hf.model.layers[l]
        at, H, Hkv = layer.self_attn, cfg.num_attention_heads, cfg.num_key_value_heads
        dh = d // H
        h = _rms_norm(x, layer.input_layernorm.weight, cfg.rms_norm_eps, r.freeze_norm)
        lin = lambda m: torch.nn.functional.linear(h, m.weight, m.bias)  # noqa: E731
        q, k, v = lin(at.q_proj).reshape(B, S, H, dh), lin(at.k_proj).reshape(B, S, Hkv, dh), lin(at.v_proj).reshape(B, S, Hkv, dh)
        w_o = at.o_proj.weight.T.reshape(H, dh, d)
        rep = H // Hkv
    q, k, v = _scale(q, r.q), _scale(k, r.k), _scale(v, r.v)
    if hf.config.model_type != "gpt2":
        theta = hf.config.rope_parameters["rope_theta"]
        q, k = _rope(q, theta), _rope(k, theta)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    pattern = _softmax(_causal_scores(q.transpose(1, 2), k.transpose(1, 2)), r.temperature)
    z = (pattern @ v.transpose(1, 2)).transpose(1, 2)  # [B, S, H, dh]
    return torch.einsum("bshe,hed->bshd", z, w_o)


def _ref_attn_bias(hf, l):
    return hf.transformer.h[l].attn.c_proj.bias if hf.config.model_type == "gpt2" else 0.0


def _ref_mlp_phi(hf, l, u, r: Rules):
    """u + MLP(norm(u)): the mlp granularity's map."""
    if hf.config.model_type == "gpt2":
        blk = hf.transformer.h[l]
        h = _layer_norm(u, blk.ln_2.weight, blk.ln_2.bias, hf.config.layer_norm_epsilon, r.freeze_norm)
        pre = h @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias
        return u + torch.nn.functional.gelu(pre, approximate="tanh") @ blk.mlp.c_proj.weight + blk.mlp.c_proj.bias
    layer = hf.model.layers[l]
    h = _rms_norm(u, layer.post_attention_layernorm.weight, hf.config.rms_norm_eps, r.freeze_norm)
    lin = lambda m, t: torch.nn.functional.linear(t, m.weight, m.bias)  # noqa: E731
    gate, up = _scale(lin(layer.mlp.gate_proj, h), r.gate), _scale(lin(layer.mlp.up_proj, h), r.up)
    return u + lin(layer.mlp.down_proj, torch.nn.functional.silu(gate) * up)


def _ref_block(hf, l, x, r: Rules):
    heads = _ref_attention(hf, l, x, r)
    mid = x + heads.sum(2) + _ref_attn_bias(hf, l)
    return heads, mid, _ref_mlp_phi(hf, l, mid, r)


def _gl(steps):
    a, w = np.polynomial.legendre.leggauss(steps)
    return torch.tensor((a + 1) / 2, dtype=torch.float64), torch.tensor(w / 2, dtype=torch.float64)


def _ref_ig(phi, z, base, steps=32):
    """IG of ||phi(x) - phi(base)|| along the straight line, per source position: ``[S]``."""
    alpha, w = _gl(steps)
    x = (base + alpha[:, None, None] * (z - base)).requires_grad_(True)
    with torch.no_grad():
        ref = phi(base[None])[0]
    (g,) = torch.autograd.grad((phi(x) - ref).norm(dim=-1).sum(), x)
    return ((z - base) * (w[:, None, None] * g).sum(0)).sum(-1)


# ---------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("granularity", ["layer", "att", "mlp"])
def test_completeness_error_below_1e_3_relative_with_32_gauss_legendre_steps(any_model, granularity):
    res = layerwise_ig(any_model, PROMPT, granularity=granularity, baseline="input_token", steps=32)
    for l in range(any_model.cfg.n_layers):
        f = res.flow(l, granularity)
        big = f.total > 1e-4
        assert big.sum() >= f.total.numel() - 1  # only BOS (sees only itself) may be ~0
        assert (f.completeness_error.abs()[big] <= 1e-3 * f.total[big]).all()
        if f.head_total is not None:
            hb = f.head_total > 1e-4
            assert (f.head_completeness_error.abs()[hb] <= 1e-3 * f.head_total[hb]).all()


def test_zero_baseline_completeness_on_layernorm_model(gpt2_model):
    res = layerwise_ig(gpt2_model, PROMPT, granularity="all", baseline="zero", steps=32,
                       quadrature="gauss_legendre")
    for f in res.flows.values():
        assert (f.completeness_error.abs() <= 1e-3 * f.total).all()


@pytest.mark.parametrize("gim", [False, True], ids=["plain", "gim"])
@pytest.mark.parametrize("baseline", ["input_token", "zero"])
def test_flows_match_an_independent_block_reference(any_model, hf_models, gim, baseline):
    hf, rules = hf_models[_arch(any_model)], (GIM_RULES if gim else Rules())
    l = 1
    tokens, clean, _ = _clean(any_model, l)
    res = layerwise_ig(any_model, tokens, layers=l, granularity="all", baseline=baseline, gim=gim, steps=8,
                       quadrature="gauss_legendre")
    z, u = clean["hook_resid_pre"], clean["hook_resid_mid"]
    T, d = z.shape
    H = any_model.cfg.n_heads
    for j in (2, T - 1):
        base = torch.zeros_like(z) if baseline == "zero" else z[j].expand(T, d)
        want = _ref_ig(lambda x: _ref_block(hf, l, x, rules)[2][:, j], z, base, 8)
        torch.testing.assert_close(res.flow(l, "layer").matrix[:, j].double(), want, atol=2e-4, rtol=2e-4)
        for h in range(H):
            want = _ref_ig(lambda x: _ref_attention(hf, l, x, rules)[:, j, h], z, base, 8)
            torch.testing.assert_close(res.flow(l, "att").heads[h, :, j].double(), want, atol=2e-4, rtol=2e-4)
        want = _ref_ig(lambda x: _ref_attention(hf, l, x, rules)[:, j].sum(1), z, base, 8)
        torch.testing.assert_close(res.flow(l, "att").matrix[:, j].double(), want, atol=2e-4, rtol=2e-4)
    # mlp: per residual dimension of u_j, for every target at once
    if baseline == "zero":
        ubase = torch.zeros_like(u)
    else:
        with torch.no_grad():
            ubase = torch.stack([_ref_block(hf, l, z[j].expand(T, d)[None], rules)[1][0, j] for j in range(T)])
    alpha, w = _gl(8)
    x = (ubase + alpha[:, None, None] * (u - ubase)).requires_grad_(True)
    with torch.no_grad():
        ref = _ref_mlp_phi(hf, l, ubase, rules)
    (g,) = torch.autograd.grad((_ref_mlp_phi(hf, l, x, rules) - ref).norm(dim=-1).sum(), x)
    want = (u - ubase) * (w[:, None, None] * g).sum(0)
    torch.testing.assert_close(res.flow(l, "mlp").matrix.double(), want, atol=2e-4, rtol=2e-4)


def test_gim_changes_the_flows(llama_model):
    plain = layerwise_ig(llama_model, PROMPT, layers=0, granularity="all", steps=8)
    gim = layerwise_ig(llama_model, PROMPT, layers=0, granularity="all", steps=8, gim=True)
    for key, f in plain.flows.items():
        assert (f.matrix - gim.flows[key].matrix).abs().max() > 1e-3, key
        torch.testing.assert_close(f.total, gim.flows[key].total, atol=1e-5, rtol=1e-5)  # same Φ
    only_t = layerwise_ig(llama_model, PROMPT, layers=0, granularity="att", steps=8,
                          gim=GIMConfig.off().with_overrides(softmax_temperature=2.0))
    assert (only_t.flow(0, "att").heads - plain.flow(0, "att").heads).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# A hand-checkable linear toy: constant norm scale and attention pattern, MLP switched off


def _linear_toy():
    kw = dict(arch="gpt2", n_layers=1, seed=5, scale=2.0)
    model, hf = tiny_model(**kw), tiny_hf_model(**kw)
    tokens = model.to_tokens("When Mary and John went")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, cache = model.run_with_cache(tokens)
    sigma = cache["blocks.0.ln1.hook_scale"]
    T = tokens.shape[1]
    pattern = torch.tril(torch.ones(T, T))
    pattern = pattern / pattern.sum(-1, keepdim=True)  # uniform causal attention
    hooks = [  # sliced: passes for early targets run on a prefix of the prompt
        ("blocks.0.ln1.hook_scale", lambda t, hook: sigma[:, : t.shape[1]].expand_as(t)),
        ("blocks.0.attn.hook_pattern", lambda t, hook: pattern[: t.shape[2], : t.shape[3]].expand_as(t)),
        ("blocks.0.hook_mlp_out", lambda t, hook: torch.zeros_like(t)),
    ]
    # Closed form. Φ_{j,h}(x) = sum_i P[j,i] (LNlin(x_i) W_V[h] W_O[h]) + const, so source i moves
    # head h's output at j by c[i,j,h] = P[j,i] LNlin(Δ_i) W_V[h] W_O[h] and, Φ being linear,
    # L(α) = α ||sum_i c[i,j,h]||: IG_{i→(j,h)} = c[i,j,h] · e_{j,h} with e the unit direction.
    z = cache["blocks.0.hook_resid_pre"][0]
    blk, H = hf.transformer.h[0], 4
    d = z.shape[-1]
    dh = d // H
    xc = z - z.mean(-1, keepdim=True)
    v = (xc / sigma[0] * blk.ln_1.weight) @ blk.attn.c_attn.weight[:, 2 * d:]
    c = torch.stack(
        [pattern.T[:, :, None] * (v[:, h * dh:(h + 1) * dh] @ blk.attn.c_proj.weight[h * dh:(h + 1) * dh])[:, None]
         for h in range(H)], dim=2)  # [i, j, h, d] with zero baseline: Δ = z
    return model, tokens, hooks, z, c.detach()


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("steps,rule", [(1, "gauss_legendre"), (3, "trapezoid"), (4, "riemann_left"), (5, "riemann_right")])
def test_linear_toy_matches_closed_form_with_any_quadrature(steps, rule):
    model, tokens, hooks, z, c = _linear_toy()
    with model.hooks(fwd_hooks=hooks):
        res = layerwise_ig(model, tokens, layers=0, granularity=["layer", "att"], baseline="zero",
                           steps=steps, quadrature=rule)
    T = z.shape[0]
    own = torch.einsum("ijhd,jhd->hij", c, _unit(c.sum(0)))
    whole = torch.einsum("ijd,jd->ij", c.sum(2), _unit(c.sum((0, 2))))
    layer = c.sum(2).clone()
    layer[torch.arange(T), torch.arange(T)] += z  # the residual: source j moves z'_j by Δ_j
    layer_ig = torch.einsum("ijd,jd->ij", layer, _unit(layer.sum(0)))
    torch.testing.assert_close(res.flow(0, "att").heads, own, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.flow(0, "att").matrix, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.flow(0, "layer").matrix, layer_ig, atol=1e-6, rtol=1e-5)


def test_shared_head_scores_are_head_shares_of_the_attention_output_on_the_linear_toy():
    model, tokens, hooks, z, c = _linear_toy()
    with model.hooks(fwd_hooks=hooks):
        res = layerwise_ig(model, tokens, layers=0, granularity="att", baseline="zero", steps=2,
                           head_scores="shared")
    e = _unit(c.sum((0, 2)))  # direction of the whole attention output's change
    torch.testing.assert_close(res.flow(0, "att").heads, torch.einsum("ijhd,jd->hij", c, e), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.flow(0, "att").heads.sum(0), res.flow(0, "att").matrix)


def test_shared_head_scores_sum_to_the_attention_boundary_result(any_model):
    for baseline in ("zero", "input_token"):
        shared = layerwise_ig(any_model, PROMPT, granularity="att", baseline=baseline, head_scores="shared")
        own = layerwise_ig(any_model, PROMPT, granularity="att", baseline=baseline)
        for l in range(any_model.cfg.n_layers):
            s, o = shared.flow(l, "att"), own.flow(l, "att")
            torch.testing.assert_close(s.heads.sum(0), o.matrix, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(s.total, o.total)


# ---------------------------------------------------------------------------------------------
# Structure: baselines, causality, batching


def test_input_token_baseline_gives_an_exactly_zero_diagonal(any_model):
    res = layerwise_ig(any_model, PROMPT, granularity=["layer", "att"], baseline="input_token", steps=8)
    for f in res.flows.values():
        assert torch.count_nonzero(torch.diagonal(f.matrix)) == 0
        if f.granularity is Granularity.ATT:
            assert torch.count_nonzero(torch.diagonal(f.heads, dim1=1, dim2=2)) == 0


def test_later_sources_contribute_exactly_nothing(any_model):
    res = layerwise_ig(any_model, PROMPT, granularity=["layer", "att"], baseline="zero", steps=8)
    for f in res.flows.values():
        assert torch.count_nonzero(torch.tril(f.matrix, -1)) == 0  # matrix[source > target]
        if f.granularity is Granularity.ATT:
            assert torch.count_nonzero(torch.tril(f.heads, -1)) == 0
        assert torch.count_nonzero(torch.triu(f.matrix)) > 0


def test_chunked_passes_give_the_same_flows(qwen2_model):
    a = layerwise_ig(qwen2_model, PROMPT, layers=1, granularity="all", steps=8)
    b = layerwise_ig(qwen2_model, PROMPT, layers=1, granularity="all", steps=8, batch_size=7)
    for key, f in a.flows.items():
        torch.testing.assert_close(f.matrix, b.flows[key].matrix, atol=1e-6, rtol=1e-5)


def _zero_ratio_column(itb, zero, j):
    rest = sum(itb[i] for i in range(len(itb)) if i != j)
    zrest = sum(zero[i] for i in range(len(zero)) if i != j)
    est = zero[j] * rest / zrest if abs(zrest) > 1e-8 else 0.0
    prov = list(itb)
    prov[j] = est
    gamma = sum(itb) / sum(prov) if abs(sum(prov)) > 1e-8 else 1.0
    return [gamma * p for p in prov]


def test_itb_zero_ratio_follows_lig_formula(gpt2_model):
    kw = dict(layers=1, granularity=["layer", "att"], steps=8, quadrature="gauss_legendre")
    itb = layerwise_ig(gpt2_model, PROMPT, baseline="input_token", **kw)
    zero = layerwise_ig(gpt2_model, PROMPT, baseline="zero", **kw)
    ratio = layerwise_ig(gpt2_model, PROMPT, baseline="itb_zero_ratio", **kw)
    for g in ("layer", "att"):
        m_i, m_z, m_r = (r.flow(1, g).matrix.double() for r in (itb, zero, ratio))
        for j in range(m_i.shape[1]):
            want = _zero_ratio_column(m_i[:, j].tolist(), m_z[:, j].tolist(), j)
            torch.testing.assert_close(m_r[:, j], torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m_r.sum(0), m_i.sum(0), atol=1e-5, rtol=1e-5)  # column sums kept
    h_i, h_z, h_r = (r.flow(1, "att").heads[2].double() for r in (itb, zero, ratio))
    want = [_zero_ratio_column(h_i[:, j].tolist(), h_z[:, j].tolist(), j) for j in range(h_i.shape[1])]
    torch.testing.assert_close(h_r, torch.tensor(want, dtype=torch.float64).T, atol=1e-5, rtol=1e-5)


def test_itb_map_ratio_uses_each_heads_self_attention(llama_model):
    itb = layerwise_ig(llama_model, PROMPT, layers=0, granularity="att", baseline="input_token", steps=8)
    mr = layerwise_ig(llama_model, PROMPT, layers=0, granularity="att", baseline="itb_map_ratio", steps=8)
    _, _, cache = _clean(llama_model, 0)
    a = torch.diagonal(cache["blocks.0.attn.hook_pattern"][0], dim1=-2, dim2=-1).double()  # [H, T]
    h_i, h_r = itb.flow(0, "att").heads.double(), mr.flow(0, "att").heads.double()
    for h in range(h_i.shape[0]):
        for j in range(1, h_i.shape[2]):
            col = h_i[h, :, j].tolist()
            rest = sum(col) - col[j]
            prov = list(col)
            prov[j] = rest * float(a[h, j]) / (1 - float(a[h, j]))
            want = torch.tensor(prov, dtype=torch.float64) * (sum(col) / sum(prov))
            torch.testing.assert_close(h_r[:, :, j][h], want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layers=2), "out of range"),
        (dict(layers=[0, -3]), "out of range"),
        (dict(layers=[]), "layers"),
        (dict(granularity="heads"), "unknown granularity"),
        (dict(baseline="mean"), "unknown baseline"),
        (dict(granularity="mlp", baseline="itb_zero_ratio"), "not defined for the mlp"),
        (dict(granularity="layer", baseline="itb_map_ratio"), "att"),
        (dict(steps=0), "steps"),
        (dict(quadrature="simpson"), "quadrature"),
        (dict(head_scores="mean"), "head_scores"),
        (dict(batch_size=0), "batch_size"),
        (dict(gim="yes"), "gim"),
        (dict(text=""), "empty"),
        (dict(text="   "), "empty"),
        (dict(text=torch.tensor([[1, 2], [3, 4]])), "one prompt"),
        (dict(text=torch.tensor([1, 99999])), "vocabulary"),
    ],
)
def test_bad_input_is_a_gimlens_error(gpt2_model, kwargs, match):
    text = kwargs.pop("text", PROMPT)
    with pytest.raises(GimlensError, match=match):
        layerwise_ig(gpt2_model, text, **kwargs)


# ---------------------------------------------------------------------------------------------
# JSON, plots, CLI


def test_json_round_trip_keeps_every_tensor_and_has_lig_fields(llama_model, tmp_path):
    res = layerwise_ig(llama_model, PROMPT, layers=[0, 1], granularity="all", steps=4, gim=True)
    path = res.save(tmp_path / "out.json")
    data = json.loads(path.read_text())
    back = LayerwiseResult.load(path)
    assert back.tokens == res.tokens and back.token_ids == res.token_ids and back.gim == res.gim
    for key, f in res.flows.items():
        g = back.flows[key]
        for name in ("matrix", "total", "heads", "head_total"):
            a, b = getattr(f, name), getattr(g, name)
            assert (a is None and b is None) or torch.equal(a, b), (key, name)
        assert g.baseline is f.baseline
    assert data["tokens"] == res.tokens and data["config"]["num_steps"] == 4
    lay = data["layers"]["1"]
    assert lay["z2z"]["matrix"] == res.flow(1, "layer").matrix.tolist()
    assert lay["z2z"]["completeness"]["error"] == res.flow(1, "layer").completeness_error.tolist()
    assert lay["z2z"]["token_to_token"][3]["contributions"][2]["value"] == pytest.approx(
        float(res.flow(1, "layer").matrix[2, 3]))
    t3 = lay["targets"]["3"]
    assert t3["z2u"]["heads"]["1"]["contributions"] == res.flow(1, "att").heads[1, :, 3].tolist()
    assert t3["u2z"]["contributions"] == res.flow(1, "mlp").matrix[3].tolist()
    assert t3["u2z"]["l2_total"] == pytest.approx(float(res.flow(1, "mlp").total[3]))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    again = LayerwiseResult.from_json(res.to_json(indent=1))
    assert again.flows.keys() == res.flows.keys()
    assert all(torch.equal(again.flows[k].matrix, f.matrix) for k, f in res.flows.items())


def test_save_honours_the_umask_and_needs_an_existing_folder(gpt2_model, tmp_path):
    res = layerwise_ig(gpt2_model, PROMPT, layers=0, steps=4)
    old = os.umask(0o022)
    try:
        paths = [res.save(tmp_path / "r.json"), res.save_plot(tmp_path / "r.png")]
    finally:
        os.umask(old)
    assert [os.stat(p).st_mode & 0o777 for p in paths] == [0o644, 0o644]
    for call in (lambda: res.save(tmp_path / "no" / "r.json"),
                 lambda: res.save_plot(tmp_path / "no" / "r.png")):
        with pytest.raises(GimlensError, match="does not exist"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]
    with pytest.raises(GimlensError, match="cannot read"):
        LayerwiseResult.load(tmp_path / "missing.json")


def test_from_json_rejects_other_documents():
    with pytest.raises(GimlensError, match="format"):
        LayerwiseResult.from_json('{"nodes": {}}')
    with pytest.raises(GimlensError, match="invalid JSON"):
        LayerwiseResult.from_json("{")


def test_plot_draws_one_panel_per_flow_and_saves(gpt2_model, tmp_path):
    res = layerwise_ig(gpt2_model, PROMPT, granularity=["layer", "att"], steps=4)
    fig = res.plot()
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4
    one = res.plot(layer=1, granularity="att", head=2)
    img = [ax for ax in one.axes if ax.images][0].images[0].get_array()
    np.testing.assert_allclose(np.asarray(img), res.flow(1, "att").heads[2].T.numpy())
    out = res.save_plot(tmp_path / "flows.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(GimlensError):
        res.plot(layer=5)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model(**TINY["llama"]).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def test_cli_writes_json_and_plot(tiny_folder, tmp_path, capsys):
    from gimlens_cli import main

    out, png = tmp_path / "flows.json", tmp_path / "flows.png"
    code = main(["layerwise", PROMPT, "--model", tiny_folder, "--layers", "0,1", "--granularity",
                 "layer,att", "--steps", "8", "--baseline", "layer=zero,att=itb_zero_ratio",
                 "-o", str(out), "--plot", str(png)])
    assert code == 0
    res = LayerwiseResult.load(out)
    assert sorted((l, g.value) for l, g in res.flows) == [(0, "att"), (0, "layer"), (1, "att"), (1, "layer")]
    assert res.flow(0, "layer").baseline is Baseline.ZERO
    assert res.flow(1, "att").baseline is Baseline.ITB_ZERO_RATIO
    assert matplotlib.image.imread(png).ndim == 3  # a decodable image
    assert "completeness" in capsys.readouterr().out


def test_cli_refuses_a_missing_output_folder_and_writes_nothing(tiny_folder, tmp_path, capsys):
    from gimlens_cli import main

    code = main(["layerwise", PROMPT, "--model", tiny_folder, "--steps", "4",
                 "-o", str(tmp_path / "missing" / "flows.json")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_cli_reports_bad_layers_with_exit_code_2(tiny_folder, capsys):
    from gimlens_cli import main

    assert main(["layerwise", PROMPT, "--model", tiny_folder, "--layers", "7"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["layerwise", PROMPT, "--model", tiny_folder, "--layers", "a,b"]) == 2


# ---------------------------------------------------------------------------------------------
# The embedded SmolLM2


@pytest.mark.slow
def test_smollm2_layer_and_att_flows_are_complete_and_causal(smollm2):
    model = smollm2
    text = "When Mary and John went to the store, John gave a drink to"
    with torch.no_grad():
        model(model.to_tokens(text))  # the bridge adds its own pre-hooks on first use
    before = model_state(model)
    # Deep layers route almost everything through the BOS attention sink (massive activations):
    # the integrand gets sharp there, so layer 20 needs 64 nodes for 1e-3 (measured: 2.7e-2 at 32,
    # 2.1e-4 at 64); layer 3 is at 1e-5 with 32.
    for layer, steps in ((3, 32), (20, 64)):
        res = layerwise_ig(model, text, layers=layer, granularity=["layer", "att"], steps=steps)
        for f in res.flows.values():
            big = f.total > 1e-3 * float(f.total.max())
            assert big.sum() == f.total.numel() - 1  # all but BOS, which sees only itself
            assert (f.completeness_error.abs()[big] <= 1e-3 * f.total[big]).all(), (layer, f.granularity)
            assert torch.count_nonzero(torch.tril(f.matrix, -1)) == 0
            assert torch.count_nonzero(torch.diagonal(f.matrix)) == 0
    assert_state_equal(before, model_state(model))


def test_default_quadrature_is_graded_for_zero_baselines_only(llama_model):
    from gimlens.layerwise import layerwise_ig

    text = "When Mary and John went"
    zero = layerwise_ig(llama_model, text, layers=0, baseline="zero", steps=14)
    itb = layerwise_ig(llama_model, text, layers=0, baseline="input_token", steps=14)
    assert zero.quadrature == "gauss_legendre_graded" and itb.quadrature == "gauss_legendre"
    explicit = layerwise_ig(llama_model, text, layers=0, baseline="zero", steps=14,
                            quadrature="gauss_legendre")
    assert explicit.quadrature == "gauss_legendre"
    # the graded default is at least as complete as plain Gauss-Legendre on the zero path
    err = lambda r: float(r.flow(0, "layer").completeness_error.abs().max())  # noqa: E731
    assert err(zero) <= err(explicit) + 1e-6
