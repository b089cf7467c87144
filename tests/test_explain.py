"""gimlens.explain: per-row targets and gradients, padding, state left as found."""

import pytest
import torch
from torch.testing import assert_close

import gimlens
from conftest import TINY
from gimlens import GimlensError
from gimlens.testing import tiny_hf_model
from reference import Rules, reference_forward, token_embeddings

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
    "Alice and Bob went to the park",
]


def _rows(model):
    return [model.to_tokens(p)[0] for p in PROMPTS]


def test_explain_equals_gradient_times_input_from_the_reference(llama_model):
    hf = tiny_hf_model(**TINY["llama"])
    ids = _rows(llama_model)[1]
    baseline = llama_model.tokenizer.encode(" ", add_special_tokens=False)[0]
    emb = token_embeddings(hf, ids[None]).detach().requires_grad_()
    logits = reference_forward(hf, emb, Rules(True, 2.0, 0.25, 0.25, 0.5, 0.5, 0.5))
    target = int(logits[0, -1].argmax())
    (grad,) = torch.autograd.grad(logits[0, -1, target], emb)
    base = hf.get_input_embeddings().weight[baseline]
    expected = (grad[0] * (emb[0].detach() - base)).sum(-1)
    got = gimlens.explain(llama_model, ids)
    assert got.shape == ids.shape
    assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_gim_switched_off_is_plain_gradient_times_input(gpt2_model):
    hf = tiny_hf_model(**TINY["gpt2"])
    ids = _rows(gpt2_model)[0]
    emb = token_embeddings(hf, ids[None]).detach().requires_grad_()
    logits = reference_forward(hf, emb, Rules())
    (grad,) = torch.autograd.grad(logits[0, -1, 7], emb)
    base = hf.get_input_embeddings().weight[3]
    expected = (grad[0] * (emb[0].detach() - base)).sum(-1)
    got = gimlens.explain(
        gpt2_model, ids, target_token_id=7, baseline_token_id=3, freeze_norm=False,
        softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None,
    )
    assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_gate_and_up_scales_are_explain_keywords_too(llama_model):
    hf = tiny_hf_model(**TINY["llama"])
    ids = _rows(llama_model)[1]
    emb = token_embeddings(hf, ids[None]).detach().requires_grad_()
    logits = reference_forward(hf, emb, Rules(True, 2.0, 0.25, 0.25, 0.5, 0.1, None))
    (grad,) = torch.autograd.grad(logits[0, -1, 7], emb)
    base = hf.get_input_embeddings().weight[3]
    expected = (grad[0] * (emb[0].detach() - base)).sum(-1)
    got = gimlens.explain(llama_model, ids, target_token_id=7, baseline_token_id=3,
                          gate_scale=0.1, up_scale=None)
    assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_batch_rows_equal_one_at_a_time_calls(any_model):
    rows = _rows(any_model)
    n = min(len(r) for r in rows)
    batch = torch.stack([r[:n] for r in rows])
    targets = torch.tensor([5, 9, 11])
    together = gimlens.explain(any_model, batch, target_token_id=targets, target_position=-2)
    for i in range(len(rows)):
        alone = gimlens.explain(any_model, batch[i], target_token_id=int(targets[i]), target_position=-2)
        assert_close(together[i], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_equal_unpadded_ones(any_model, side):
    rows = _rows(any_model)
    batch = any_model.to_tokens(PROMPTS, padding_side=side)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        if side == "right":
            mask[i, : len(r)] = 1
        else:
            mask[i, batch.shape[1] - len(r):] = 1
    padded = gimlens.explain(any_model, batch, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = gimlens.explain(any_model, r)
        assert_close(padded[i][mask[i].bool()], alone, rtol=1e-4, atol=1e-5)
        assert torch.all(padded[i][~mask[i].bool()] == 0)


def test_train_mode_model_is_explained_in_eval_mode(gpt2_model):
    gpt2_model.train()
    try:
        scores = gimlens.explain(gpt2_model, _rows(gpt2_model)[1])
    finally:
        gpt2_model.eval()
    assert_close(scores, gimlens.explain(gpt2_model, _rows(gpt2_model)[1]))  # dropout was off


def test_baseline_inference_prefers_space_then_pad_then_unk(llama_model):
    from gimlens.attribution.gradients import default_baseline_token

    tok = llama_model.tokenizer
    assert default_baseline_token(tok) == tok.encode(" ", add_special_tokens=False)[0]

    class NoSpace:
        pad_token_id = None
        unk_token_id = 4

        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    assert default_baseline_token(NoSpace()) == 4
    NoSpace.pad_token_id = 9
    assert default_baseline_token(NoSpace()) == 9
    NoSpace.pad_token_id = NoSpace.unk_token_id = None
    with pytest.raises(GimlensError, match="baseline"):
        default_baseline_token(NoSpace())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_position=50), "outside the sequence"),
        (dict(target_token_id=-1), "target_token_id"),
        (dict(baseline_token_id=10**6), "baseline_token_id"),
        (dict(target_token_id=torch.tensor([1, 2])), "target_token_id"),
        (dict(attention_mask=torch.ones(1, 3)), "attention_mask"),
        (dict(q_scale="half"), "q_scale"),
        (dict(q_scale=-0.25), "q_scale"),
        (dict(v_scale=float("nan")), "v_scale"),
        (dict(softmax_temperature=0.0), "softmax_temperature"),
        (dict(softmax_temperature=-2.0), "softmax_temperature"),
        (dict(target_token_id=" the capital of France"), "exactly one token"),
    ],
)
def test_bad_input_is_a_gimlens_error(llama_model, kwargs, match):
    with pytest.raises(GimlensError, match=match):
        gimlens.explain(llama_model, _rows(llama_model)[1], **kwargs)


def test_a_misspelt_gim_keyword_is_a_type_error(llama_model):
    with pytest.raises(TypeError, match="temprature"):
        gimlens.explain(llama_model, _rows(llama_model)[1], temprature=2.0)


def test_target_token_id_takes_the_text_of_one_token(llama_model):
    ids = _rows(llama_model)[1]
    text = " the"
    (token,) = llama_model.tokenizer.encode(text, add_special_tokens=False)
    by_text = gimlens.explain(llama_model, ids, target_token_id=text)
    by_id = gimlens.explain(llama_model, ids, target_token_id=token)
    top = gimlens.explain(llama_model, ids)
    assert torch.equal(by_text, by_id) and not torch.equal(by_id, top)


def test_none_switches_any_rule_off_freeze_norm_included(llama_model):
    ids = _rows(llama_model)[1]
    none = gimlens.explain(llama_model, ids, freeze_norm=None)
    false = gimlens.explain(llama_model, ids, freeze_norm=False)
    on = gimlens.explain(llama_model, ids)
    assert torch.equal(none, false) and not torch.equal(none, on)
    all_none = {f: None for f in ("freeze_norm", "softmax_temperature", "q_scale", "k_scale",
                                  "v_scale", "gate_scale", "up_scale")}
    plain = gimlens.attribute(llama_model, ids, method="gradient_x_input", score_bos=True).scores[0]
    assert_close(gimlens.explain(llama_model, ids, **all_none), plain)


def test_float_input_ids_are_rejected(llama_model):
    with pytest.raises(GimlensError, match="integer"):
        gimlens.explain(llama_model, torch.randn(5))
