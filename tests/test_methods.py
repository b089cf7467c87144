"""Attribution methods against hand-derived answers, plain-autograd references and hand loops."""

import warnings

import pytest
import torch
from torch.testing import assert_close

from conftest import TINY
from gimlens import GIMConfig, GimlensError
from gimlens.attribution import attribute
from gimlens.models import load_model
from gimlens.testing import tiny_hf_model, tiny_tokenizer
from reference import Rules, reference_forward, token_embeddings

PROMPT = "When Mary and John went to the store, John gave a drink to"
GIM_RULES = Rules(True, 2.0, 0.25, 0.25, 0.5, 0.5, 0.5)
METHODS = ["gradient_x_input", "gim", "integrated_gradients", "feature_ablation"]

# ---------------------------------------------------------------------------------------------
# A known-answer model: a one-layer GPT-2 made affine in its token embeddings.
#   W_Q = W_K = 0          -> every attention pattern is exactly uniform over the causal prefix
#   MLP output weights 0   -> the MLP adds nothing
#   LayerNorm eps = 1e8, gain = sqrt(eps), bias 0 -> LN(x) = x − mean(x) up to var(x)/eps ~ 1e-8
# so logit_t = [C(x_L) + (1/(L+1)) Σ_j C(C(x_j) W_V W_O)] · U_t + const, with C centring over
# d_model. Every method then gives a_j = (direct_j + attn_j) · (e(x_j) − e(x')) exactly, and GIM
# multiplies the attention path by v_scale (the Q/K paths carry no gradient: W_Q = W_K = 0).

EPS = 1e8


def _linear_gpt2_hf():
    hf = tiny_hf_model("gpt2", n_layers=1, seed=5, scale=10.0)
    d = hf.config.n_embd
    hf.config.layer_norm_epsilon = EPS
    with torch.no_grad():
        block = hf.transformer.h[0]
        block.attn.c_attn.weight[:, : 2 * d] = 0
        block.attn.c_attn.bias.zero_()
        block.attn.c_proj.bias.zero_()
        block.mlp.c_proj.weight.zero_()
        block.mlp.c_proj.bias.zero_()
        for ln in (block.ln_1, block.ln_2, hf.transformer.ln_f):
            ln.eps = EPS
            ln.weight.fill_(EPS**0.5)
            ln.bias.zero_()
    return hf


@pytest.fixture(scope="module")
def linear_gpt2():
    hf = _linear_gpt2_hf()
    parts = {
        "E": hf.transformer.wte.weight.detach().clone(),
        "W_VO": (hf.transformer.h[0].attn.c_attn.weight[:, 2 * hf.config.n_embd:]
                 @ hf.transformer.h[0].attn.c_proj.weight).detach().clone(),
        "U": hf.lm_head.weight.detach().clone(),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(hf, tokenizer=tiny_tokenizer())
        model(model.to_tokens("warm up"))
    return model, parts


def _hand_answer(parts, ids, target, baseline, v_scale=1.0):
    center = lambda v: v - v.mean(-1, keepdim=True)  # noqa: E731
    delta = parts["E"][ids] - parts["E"][baseline]
    u = parts["U"][target]
    direct = torch.zeros(len(ids))
    direct[-1] = center(delta[-1]) @ u
    attn = center(center(delta) @ parts["W_VO"]) @ u / len(ids)
    return direct + v_scale * attn


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_the_hand_derived_answer_on_an_affine_model(linear_gpt2, method):
    model, parts = linear_gpt2
    ids = model.to_tokens(PROMPT)[0, 1:]  # no BOS: every position is scored
    target, baseline = 7, 3
    kwargs = {"steps": 2} if method == "integrated_gradients" else {}
    got = attribute(model, ids, method=method, target=target, baseline=baseline, **kwargs)
    v_scale = GIMConfig().v_scale if method == "gim" else 1.0
    expected = _hand_answer(parts, ids, target, baseline, v_scale)
    assert expected[:-1].abs().max() > 0.05 * expected[-1].abs()  # the attention path matters
    assert_close(got.scores[0], expected, rtol=2e-4, atol=2e-4 * float(expected.abs().max()))
    if method == "integrated_gradients":
        assert float(got.delta[0]) < 1e-4 * float(expected.abs().sum())


# ---------------------------------------------------------------------------------------------
# Gradient methods against the plain-PyTorch reference forward (tests/reference.py).


def _reference_ig(hf, ids, target, baseline, alphas, weights, rules):
    emb = token_embeddings(hf, ids[None]).detach()
    base = token_embeddings(hf, torch.full_like(ids[None], baseline)).detach()
    base[:, 0] = emb[:, 0]  # BOS is its own baseline
    total = torch.zeros_like(emb)
    for a, w in zip(alphas.tolist(), weights.tolist()):
        point = (base + a * (emb - base)).requires_grad_()
        logits = reference_forward(hf, point, rules)
        (grad,) = torch.autograd.grad(logits[0, -1, target], point)
        total += w * grad
    return (total * (emb - base)).sum(-1)[0]


@pytest.mark.parametrize("gim", [False, True])
def test_integrated_gradients_equals_a_reference_quadrature_loop(llama_model, gim):
    from gimlens.quadrature import nodes_and_weights

    hf = tiny_hf_model(**TINY["llama"])
    ids = llama_model.to_tokens(PROMPT)[0]
    alphas, weights = nodes_and_weights(6)
    rules = GIM_RULES if gim else Rules()
    expected = _reference_ig(hf, ids, 11, 5, alphas.float(), weights.float(), rules)
    got = attribute(llama_model, ids, method="integrated_gradients", target=11, baseline=5, steps=6, gim=gim)
    assert got.scores[0, 0] == 0
    assert_close(got.scores[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method, rules", [("gradient_x_input", Rules()), ("gim", GIM_RULES)])
def test_gradient_methods_equal_plain_autograd_on_the_reference(gpt2_model, method, rules):
    hf = tiny_hf_model(**TINY["gpt2"])
    ids = gpt2_model.to_tokens(PROMPT)[0]
    one = torch.ones(1)
    expected = _reference_ig(hf, ids, 9, 5, one, one, rules)
    got = attribute(gpt2_model, PROMPT, method=method, target=9, baseline=5)
    assert_close(got.scores[0], expected, rtol=1e-5, atol=1e-6)


def test_ig_completeness_delta_shrinks_as_steps_grow_and_gauss_legendre_beats_riemann(any_model):
    deltas = [
        float(attribute(any_model, PROMPT, method="integrated_gradients", target=9, steps=s).delta[0])
        for s in (1, 2, 32)
    ]
    a = attribute(any_model, PROMPT, method="integrated_gradients", target=9, steps=32)
    gap = float(a.target_values[0, 0]) - _baseline_value(any_model, a)
    assert abs(gap) > 1e-2
    assert deltas[-1] < 1e-3 * abs(gap)
    assert deltas[-1] < 0.01 * min(deltas[0], deltas[1])
    # the reported delta is |Σ a − (F(x) − F(x'))| with F(x') from a separate forward
    assert_close(float(a.delta[0]), abs(float(a.scores.sum()) - gap), rtol=0, atol=1e-4)
    for steps in (8, 16):  # from a few steps on, Gauss-Legendre is far more exact than Riemann
        gl = attribute(any_model, PROMPT, method="integrated_gradients", target=9, steps=steps)
        for rule in ("riemann_middle", "trapezoid"):
            other = attribute(any_model, PROMPT, method="integrated_gradients", target=9, steps=steps, quadrature=rule)
            assert float(gl.delta[0]) < float(other.delta[0]), (steps, rule)


def _baseline_value(model, a):
    ids = a.token_ids.clone()
    ids[a.scored] = a.baseline_token_id
    with torch.no_grad():
        return float(model(ids)[0, -1, int(a.target_ids[0, 0])])


def test_feature_ablation_equals_a_hand_loop_of_forwards(any_model):
    texts = [PROMPT, "The capital of France is"]
    a = attribute(any_model, texts, method="feature_ablation", target=[9, 13], batch_size=5)
    for b, text in enumerate(texts):
        ids = any_model.to_tokens(text)
        with torch.no_grad():
            full = float(any_model(ids)[0, -1, a.target_ids[b, 0]])
            expected = torch.zeros(ids.shape[1])
            bos = int(ids[0, 0]) == any_model.tokenizer.bos_token_id  # BOS is its own baseline
            for i in range(int(bos), ids.shape[1]):
                changed = ids.clone()
                changed[0, i] = a.baseline_token_id
                expected[i] = full - float(any_model(changed)[0, -1, a.target_ids[b, 0]])
        row = a.scores[b][a.attention_mask[b].bool()]
        assert_close(row, expected, rtol=1e-4, atol=1e-5)
        assert_close(float(a.target_values[b, 0]), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["integrated_gradients", "feature_ablation", "gim"])
def test_batch_size_changes_nothing(qwen2_model, method):
    texts = [PROMPT, "The capital of France is", "Alice and Bob went to the park"]
    kw = {"steps": 5} if method == "integrated_gradients" else {}
    small = attribute(qwen2_model, texts, method=method, batch_size=2, **kw)
    large = attribute(qwen2_model, texts, method=method, batch_size=64, **kw)
    assert_close(small.scores, large.scores, rtol=1e-4, atol=1e-5)
    assert torch.equal(small.target_ids, large.target_ids)


def test_unknown_method_is_an_error_listing_the_known_ones(llama_model):
    with pytest.raises(GimlensError, match="expected one of 'gradient_x_input', 'gim', 'integrated_gradients', 'feature_ablation'"):
        attribute(llama_model, PROMPT, method="saliency")


@pytest.mark.slow
def test_on_real_model_ig_converges_and_ablation_matches_single_forwards(real_model):
    model = real_model
    text, answer = "When Emily and Peter went to the store, Peter gave a drink to", " Emily"
    ig = attribute(model, text, target=answer, method="integrated_gradients", steps=64)
    base = ig.token_ids.clone()
    base[ig.scored] = ig.baseline_token_id
    with torch.no_grad():
        gap = float(ig.target_values[0, 0]) - float(model(base)[0, -1, int(ig.target_ids[0, 0])])
    assert float(ig.delta[0]) < 0.02 * abs(gap)
    loo = attribute(model, text, target=answer, method="feature_ablation")
    ids = loo.token_ids
    with torch.no_grad():
        full = float(model(ids)[0, -1, int(loo.target_ids[0, 0])])
        for i in (2, 5, ids.shape[1] - 1):
            changed = ids.clone()
            changed[0, i] = loo.baseline_token_id
            expected = full - float(model(changed)[0, -1, int(loo.target_ids[0, 0])])
            assert abs(float(loo.scores[0, i]) - expected) < 1e-3 * max(1.0, abs(expected))
