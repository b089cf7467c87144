"""GIM's forward-hook implementation against a second, independent one built from backward hooks.

Runs on TransformerBridge tiny models and, where TransformerLens 3.x is installed, on
``HookedTransformer`` models (CI runs this file again in a TransformerLens 3.9 environment).
"""

import warnings

import pytest
import torch
from torch.testing import assert_close

from gimlens import GIM, GIMConfig
from gimlens.rules import temperature_softmax_backward

CONFIGS = {
    "defaults": GIMConfig(),
    "freeze_only": GIMConfig.off().with_overrides(freeze_norm=True),
    "temperature_only": GIMConfig.off().with_overrides(softmax_temperature=3.0),
    "qkv_only": GIMConfig.off().with_overrides(q_scale=0.1, k_scale=0.2, v_scale=0.3),
    "mlp_only": GIMConfig.off().with_overrides(gate_scale=0.4, up_scale=0.6),
}


def _backward_hooks(model, config: GIMConfig):
    """The same rules as gradient replacements in backward hooks (no custom autograd)."""
    fwd, bwd = [], []
    L = model.cfg.n_layers
    if config.freeze_norm:
        names = {n for n in model.hook_dict if n.endswith("hook_scale")}
        bwd += [(n, lambda g, hook: torch.zeros_like(g)) for n in sorted(names)]
    if config.softmax_temperature is not None:
        for l in range(L):
            saved = {}

            def keep(t, hook, saved=saved):
                saved["s"] = t.detach()

            def grab(g, hook, saved=saved):
                saved["g"] = g

            def replace(g, hook, saved=saved):
                return temperature_softmax_backward(saved["s"], saved["g"], config.softmax_temperature)

            fwd.append((f"blocks.{l}.attn.hook_attn_scores", keep))
            bwd.append((f"blocks.{l}.attn.hook_pattern", grab))
            bwd.append((f"blocks.{l}.attn.hook_attn_scores", replace))
    scales = {"attn.hook_q": config.q_scale, "attn.hook_k": config.k_scale, "attn.hook_v": config.v_scale}
    if model.cfg.gated_mlp:
        scales.update({"mlp.hook_pre": config.gate_scale, "mlp.hook_pre_linear": config.up_scale})
    for suffix, c in scales.items():
        if c is not None:
            bwd += [(f"blocks.{l}.{suffix}", lambda g, hook, c=c: g * c) for l in range(L)]
    return fwd, bwd


def _grad(model, tokens, weights, run):
    emb = model.embed(tokens).detach().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = run(emb)
        (grad,) = torch.autograd.grad((logits[:, -1] @ weights).sum(), emb)
    return grad


def _check(model, config):
    tokens = torch.randint(1, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    weights = torch.randn(model.cfg.d_vocab, generator=torch.Generator().manual_seed(1))
    embed = lambda emb: [("hook_embed", lambda t, hook: emb)]

    def with_gim(emb):
        with GIM(model, config):
            return model.run_with_hooks(tokens, fwd_hooks=embed(emb))

    def with_bwd_hooks(emb):
        fwd, bwd = _backward_hooks(model, config)
        with model.hooks(fwd_hooks=embed(emb) + fwd, bwd_hooks=bwd):
            logits = model(tokens)
            (grad,) = torch.autograd.grad((logits[:, -1] @ weights).sum(), emb, retain_graph=True)
        holder["grad"] = grad
        return logits

    holder = {}
    got = _grad(model, tokens, weights, with_gim)
    _grad(model, tokens, weights, with_bwd_hooks)
    plain = _grad(model, tokens, weights, lambda emb: model.run_with_hooks(tokens, fwd_hooks=embed(emb)))
    expected = holder["grad"]
    assert_close(got, expected, rtol=1e-5, atol=1e-7)
    if config == CONFIGS["mlp_only"] and not model.cfg.gated_mlp:
        assert_close(got, plain)  # plain MLPs are never scaled
    else:
        assert not torch.allclose(got, plain, rtol=1e-4, atol=1e-6)  # the rules visibly act


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bridge_matches_backward_hook_implementation(any_model, name):
    _check(any_model, CONFIGS[name])


def _hooked_transformers():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    common = dict(n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=512, seed=0)
    gpt2 = HookedTransformer(HookedTransformerConfig(act_fn="gelu_new", normalization_type="LN", **common))
    llama = HookedTransformer(HookedTransformerConfig(
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
        n_key_value_heads=2, d_mlp=64, **common))
    for m in (gpt2, llama):
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(3.0) if p.ndim >= 2 else p.add_(0.1 * torch.randn_like(p))
    return {"gpt2": gpt2.eval(), "llama": llama.eval()}


@pytest.mark.hooked_transformer
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_hooked_transformer_matches_backward_hook_implementation(arch, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _hooked_transformers()[arch]
    _check(model, CONFIGS[name])
