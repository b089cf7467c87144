"""GIM on tiny bridges against the independent reference in tests/reference.py."""


import warnings

import pytest
import torch
from torch.testing import assert_close

from conftest import TINY
import dataclasses
import inspect

from gimlens import GIM, GIMConfig, GimlensError, explain
from gimlens.gim import RULES, Rule, gim_hooks, scale_hooks
from gimlens.testing import tiny_hf_model
from reference import Rules, reference_forward, token_embeddings

PROMPTS = ["When Mary and John went to the store, John gave", "The capital of France is Paris and the"]

# (GIMConfig overrides on top of everything-off, reference rules) for each rule alone and all on
CASES = {
    "freeze_norm": (dict(freeze_norm=True), dict(freeze_norm=True)),
    "softmax_temperature": (dict(softmax_temperature=2.0), dict(temperature=2.0)),
    "q_scale": (dict(q_scale=0.25), dict(q=0.25)),
    "k_scale": (dict(k_scale=0.25), dict(k=0.25)),
    "v_scale": (dict(v_scale=0.5), dict(v=0.5)),
    "gate_scale": (dict(gate_scale=0.5), dict(gate=0.5)),
    "up_scale": (dict(up_scale=0.5), dict(up=0.5)),
    "all_defaults": (None, dict(freeze_norm=True, temperature=2.0, q=0.25, k=0.25, v=0.5, gate=0.5, up=0.5)),
}


def _tokens(model):
    toks = model.to_tokens(PROMPTS, padding_side="right")
    return toks[:, :9]


def _bridge_grad(model, tokens, emb, weights, config):
    leaf = emb.clone().requires_grad_()
    with GIM(model, config):
        logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda t, hook: leaf)])
    (grad,) = torch.autograd.grad((logits[:, -1] @ weights).sum(), leaf)
    return logits.detach(), grad


def _reference_grad(hf, emb, weights, rules):
    leaf = emb.clone().requires_grad_()
    logits = reference_forward(hf, leaf, rules)
    (grad,) = torch.autograd.grad((logits[:, -1] @ weights).sum(), leaf)
    return logits.detach(), grad


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def setup(request):
    model = request.getfixturevalue(f"{request.param}_model")
    hf = tiny_hf_model(**TINY[request.param])
    tokens = _tokens(model)
    emb = token_embeddings(hf, tokens).detach()
    weights = torch.randn(model.cfg.d_vocab, generator=torch.Generator().manual_seed(0))
    return request.param, model, hf, tokens, emb, weights


def test_reference_reproduces_the_bridge_forward(setup):
    _, model, hf, tokens, emb, _ = setup
    assert_close(reference_forward(hf, emb, Rules()), model(tokens), rtol=1e-5, atol=1e-5)


def test_all_rules_off_equals_plain_autograd_exactly(setup):
    _, model, _, tokens, emb, weights = setup
    leaf = emb.clone().requires_grad_()
    logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda t, hook: leaf)])
    (plain,) = torch.autograd.grad((logits[:, -1] @ weights).sum(), leaf)
    _, gim_off = _bridge_grad(model, tokens, emb, weights, GIMConfig.off())
    assert torch.equal(gim_off, plain)


@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_matches_the_reference(setup, case):
    arch, model, hf, tokens, emb, weights = setup
    overrides, rules = CASES[case]
    if arch == "gpt2":  # plain GELU MLPs are never scaled
        rules = {k: v for k, v in rules.items() if k not in ("gate", "up")}
    config = GIMConfig() if overrides is None else GIMConfig.off().with_overrides(**overrides)
    _, got = _bridge_grad(model, tokens, emb, weights, config)
    _, expected = _reference_grad(hf, emb, weights, Rules(**rules))
    _, plain = _reference_grad(hf, emb, weights, Rules())
    error = ((got - expected).norm() / expected.norm()).item()
    assert error <= 1e-5
    effect = ((expected - plain).norm() / plain.norm()).item()
    if arch == "gpt2" and case in ("gate_scale", "up_scale"):  # plain MLPs: no hook, same gradient
        assert gim_hooks(model, config) == []
        _, bridge_plain = _bridge_grad(model, tokens, emb, weights, GIMConfig.off())
        assert torch.equal(got, bridge_plain)
    else:
        assert effect > 100 * max(error, 1e-7), f"{case} does not visibly act on {arch}"


def test_forward_is_unchanged(setup):
    arch, model, _, tokens, _, _ = setup
    plain = model(tokens)
    with GIM(model):
        hooked = model(tokens)
    if arch == "gpt2":
        assert torch.equal(hooked, plain)
    else:  # RMSNorm bridges rebuild the norm once hook_scale is edited
        assert (hooked - plain).abs().max().item() <= 1e-5
        assert_close(hooked, plain, rtol=1e-6, atol=1e-6)


def test_backward_after_the_block_still_follows_gim(llama_model):
    hf = tiny_hf_model(**TINY["llama"])
    tokens = _tokens(llama_model)
    emb = token_embeddings(hf, tokens).detach()
    w = torch.randn(llama_model.cfg.d_vocab)
    leaf = emb.clone().requires_grad_()
    with GIM(llama_model):
        logits = llama_model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda t, hook: leaf)])
    (after,) = torch.autograd.grad((logits[:, -1] @ w).sum(), leaf)  # outside the block
    _, inside = _bridge_grad(llama_model, tokens, emb, w, GIMConfig())
    assert_close(after, inside)
    # and a forward pass run outside the block is plain, wherever its backward runs
    leaf2 = emb.clone().requires_grad_()
    logits = llama_model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda t, hook: leaf2)])
    with GIM(llama_model):
        (outside,) = torch.autograd.grad((logits[:, -1] @ w).sum(), leaf2)
    _, plain = _bridge_grad(llama_model, tokens, emb, w, GIMConfig.off())
    assert torch.equal(outside, plain)


def test_missing_hook_points_are_named_and_nothing_is_added(llama_model):
    class Shrunk:
        """A model view that lacks the attention-score hooks."""

        cfg = llama_model.cfg
        hook_dict = {k: v for k, v in llama_model.hook_dict.items() if "hook_attn_scores" not in k}

        def hooks(self, **kw):  # pragma: no cover - must not be reached
            raise AssertionError("hooks added to a model that lacks hook points")

    with pytest.raises(GimlensError, match="blocks.0.attn.hook_attn_scores"):
        GIM(Shrunk())
    # switching the rule off makes the same model acceptable
    GIM(Shrunk(), softmax_temperature=None)


@pytest.mark.parametrize(
    "bad", [dict(softmax_temperature=0), dict(softmax_temperature=-1.0), dict(q_scale=float("nan")),
            dict(freeze_norm="yes"), dict(v_scale="half")],
)
def test_bad_config_is_a_gimlens_error(bad):
    with pytest.raises(GimlensError):
        GIMConfig.off().with_overrides(**bad)


def test_unknown_option_is_a_gimlens_error(llama_model):
    with pytest.raises(GimlensError, match="unknown GIM option"):
        GIM(llama_model, temprature=2.0)


def test_gim_config_coercion():
    assert GIMConfig.coerce(True) == GIMConfig()
    assert GIMConfig.coerce(None).is_off and GIMConfig.coerce(False).is_off
    assert GIMConfig.coerce({"q_scale": 0.1}).q_scale == 0.1
    assert not GIMConfig().is_off
    assert GIMConfig.off().with_overrides(q_scale=1.0).is_off  # a scale of 1 is off


def test_config_fields_and_explain_keywords_agree_with_the_rule_table():
    """GIMConfig's written-out fields and explain's written-out GIM keywords are the rule table's
    fields, in its order, with its defaults; validation, off() and is_off come from the table."""
    fields = dataclasses.fields(GIMConfig)
    assert [f.name for f in fields] == [r.field for r in RULES]
    assert [f.default for f in fields] == [r.default for r in RULES]
    assert GIMConfig.RULES is RULES
    assert GIMConfig() == GIMConfig(**{r.field: r.default for r in RULES})
    assert GIMConfig.off() == GIMConfig(**{r.field: r.off for r in RULES})
    assert GIMConfig.__dataclass_params__.frozen
    for rule in RULES:  # each rule alone switches is_off, and refuses a wrong value by name
        assert not GIMConfig.off().with_overrides(**{rule.field: rule.default}).is_off
        assert GIMConfig().with_overrides(**{rule.field: None}) == GIMConfig().with_overrides(
            **{rule.field: rule.off})  # None switches any rule off
        with pytest.raises(GimlensError, match=rule.field):
            GIMConfig.off().with_overrides(**{rule.field: "wrong"})
    params = {n: p for n, p in inspect.signature(explain).parameters.items() if n in [f.name for f in fields]}
    assert list(params) == [r.field for r in RULES]
    assert all(params[r.field].default == r.default and params[r.field].kind is p.KEYWORD_ONLY
               for r in RULES for p in [params[r.field]])


@pytest.mark.parametrize("field, value", [("q_scale", -0.25), ("k_scale", -1.0), ("v_scale", -1e-9),
                                          ("gate_scale", -0.5), ("up_scale", float("-inf")),
                                          ("softmax_temperature", 0.0), ("softmax_temperature", -2.0),
                                          ("freeze_norm", 1)])
def test_negative_scales_and_non_positive_temperatures_are_refused(field, value):
    with pytest.raises(GimlensError, match=field):
        GIMConfig(**{field: value})
    assert GIMConfig(q_scale=0.0).q_scale == 0.0  # a zero scale is allowed: it stops the gradient


def test_a_new_rule_is_one_table_entry_and_one_field(llama_model):
    """A rule added to the table (here: the gradient at the last block's output halved) and one
    field of a config subclass get validation, off(), is_off and hooks with no other edit."""
    last = f"blocks.{llama_model.cfg.n_layers - 1}.hook_resid_post"
    extra = Rule("resid_scale", 0.5, None, "gradient multiplier at the last block's output.",
                 lambda model: [last], scale_hooks)

    @dataclasses.dataclass(frozen=True)
    class Config(GIMConfig):
        resid_scale: float | None = 0.5
        RULES = (*RULES, extra)

    assert Config().resid_scale == 0.5 and Config.off().resid_scale is None and Config.off().is_off
    only = Config.off().with_overrides(resid_scale=0.5)
    assert not only.is_off and [n for n, _ in gim_hooks(llama_model, only)] == [last]
    with pytest.raises(GimlensError, match="resid_scale"):
        Config(resid_scale=float("inf"))
    # and the hook does what the entry says: every embedding gradient halved
    tokens = _tokens(llama_model)
    emb = llama_model.embed(tokens).detach()
    w = torch.randn(llama_model.cfg.d_vocab, generator=torch.Generator().manual_seed(1))
    _, plain = _bridge_grad(llama_model, tokens, emb, w, GIMConfig.off())
    _, halved = _bridge_grad(llama_model, tokens, emb, w, only)
    assert_close(halved, 0.5 * plain)


def test_a_model_without_hook_points_is_a_gimlens_error():
    with pytest.raises(GimlensError, match="TransformerLens model"):
        GIM(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family,idle", [("gptj", True), ("opt", True), ("gpt2", False), ("llama", False)])
def test_a_rule_whose_hook_points_never_fire_is_reported_not_skipped(family, idle):
    """GPT-J's and OPT's bridges keep `hook_attn_scores` / `hook_pattern` but never call them:
    the softmax rule cannot act there, and gim_hooks (so GIM, explain, circuits) says so."""
    from gimlens.gim import fired_hooks
    from gimlens.testing import tiny_model

    model = tiny_model(family, n_layers=1)
    pattern = "blocks.0.attn.hook_pattern"
    assert (pattern in fired_hooks(model, [pattern])) is not idle
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gim_hooks(model, GIMConfig(freeze_norm=None, q_scale=None, k_scale=None, v_scale=None,
                                   gate_scale=None, up_scale=None))
    said = [str(w.message) for w in caught if "softmax_temperature cannot act" in str(w.message)]
    assert bool(said) is idle
