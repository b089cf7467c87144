"""Targets: top prediction, token strings, positions, logit differences, log-probabilities and
multi-token continuations."""

import pytest
import torch
from torch.testing import assert_close

from conftest import TINY
from gimlens import GimlensError
from gimlens.attribution import Continuation, LogitDiff, TokenTarget, attribute
from gimlens.testing import tiny_hf_model
from reference import Rules, reference_forward, token_embeddings

PROMPT = "When Mary and John went to the store, John gave a drink to"
TEXTS = [PROMPT, "The capital of France is"]


def _ids(model, text):
    return model.tokenizer.encode(text, add_special_tokens=False)


def test_default_target_is_the_top_prediction_at_each_rows_last_real_token(any_model):
    a = attribute(any_model, TEXTS, method="feature_ablation")
    for i, text in enumerate(TEXTS):
        with torch.no_grad():
            logits = any_model(any_model.to_tokens(text))[0, -1]
        assert int(a.target_ids[i, 0]) == int(logits.argmax())
        assert_close(float(a.target_values[i, 0]), float(logits.max()), rtol=1e-5, atol=1e-5)


def test_a_token_string_equals_its_id(llama_model):
    paris = _ids(llama_model, " Paris")
    assert len(paris) == 1
    by_text = attribute(llama_model, TEXTS[1], target=" Paris")
    by_id = attribute(llama_model, TEXTS[1], target=paris[0])
    assert torch.equal(by_text.scores, by_id.scores)


def test_per_row_targets_are_one_per_row(gpt2_model):
    both = attribute(gpt2_model, TEXTS, target=[" Mary", " Paris"])
    for i, (text, tok) in enumerate(zip(TEXTS, [" Mary", " Paris"])):
        alone = attribute(gpt2_model, text, target=tok)
        real = both.attention_mask[i].bool()
        assert_close(both.scores[i][real], alone.scores[0], rtol=1e-4, atol=1e-5)


def test_an_earlier_position_ignores_later_tokens(llama_model):
    ids = llama_model.to_tokens(PROMPT)[0]
    p = 6
    a = attribute(llama_model, ids, method="gradient_x_input", target=TokenTarget(9, position=p))
    cut = attribute(llama_model, ids[: p + 1], method="gradient_x_input", target=9)
    assert_close(a.scores[0, : p + 1], cut.scores[0], rtol=1e-5, atol=1e-6)
    assert torch.all(a.scores[0, p + 1:] == 0)  # causal: later tokens cannot move this logit
    assert a.target_positions.tolist() == [[p]]


@pytest.mark.parametrize("method", ["gim", "integrated_gradients", "feature_ablation"])
def test_a_logit_difference_is_the_difference_of_two_attributions(qwen2_model, method):
    kw = {"steps": 6} if method == "integrated_gradients" else {}
    diff = attribute(qwen2_model, TEXTS, method=method, target=LogitDiff(" Paris", " Rome"), **kw)
    paris = attribute(qwen2_model, TEXTS, method=method, target=" Paris", **kw)
    rome = attribute(qwen2_model, TEXTS, method=method, target=" Rome", **kw)
    assert_close(diff.scores, paris.scores - rome.scores, rtol=1e-4, atol=1e-5)
    assert_close(diff.target_values, paris.target_values - rome.target_values, rtol=1e-5, atol=1e-5)
    assert diff.target["kind"] == "logit_diff" and diff.target["contrast_tokens"] == [[" Rome"], [" Rome"]]


def test_log_probability_readout_equals_autograd_of_the_reference(gpt2_model):
    hf = tiny_hf_model(**TINY["gpt2"])
    ids = gpt2_model.to_tokens(PROMPT)[0]
    target, baseline = 21, 5
    emb = token_embeddings(hf, ids[None]).detach().requires_grad_()
    logp = reference_forward(hf, emb, Rules())[0, -1].log_softmax(-1)[target]
    (grad,) = torch.autograd.grad(logp, emb)
    diff = emb[0].detach() - hf.get_input_embeddings().weight[baseline]
    expected = (grad[0] * diff).sum(-1)
    expected[0] = 0  # BOS
    got = attribute(gpt2_model, ids, method="gradient_x_input", baseline=baseline,
                    target=TokenTarget(target, readout="logprob"))
    assert_close(got.scores[0], expected, rtol=1e-5, atol=1e-6)
    assert_close(float(got.target_values[0, 0]), float(logp.detach()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["gim", "feature_ablation"])
@pytest.mark.parametrize("readout", ["logit", "logprob"])
def test_continuation_rows_equal_single_token_attributions_on_the_extended_input(llama_model, method, readout):
    cont = _ids(llama_model, " Paris is")
    assert len(cont) == 2
    a = attribute(llama_model, TEXTS[1], method=method, target=Continuation(" Paris is", readout=readout))
    prompt = llama_model.to_tokens(TEXTS[1])[0]
    P = len(prompt)
    assert a.scores.shape == (1, 2, P) and a.is_continuation
    assert a.target["tokens"] == [[" Paris", " is"]]
    assert a.target_positions.tolist() == [[P - 1, P]]
    for j, token in enumerate(cont):
        extended = torch.cat([prompt, torch.tensor(cont[:j], dtype=prompt.dtype)])
        single = attribute(llama_model, extended, method=method, target=TokenTarget(token, readout=readout))
        assert_close(a.scores[0, j], single.scores[0, :P], rtol=1e-4, atol=1e-5)
        assert_close(a.target_values[0, j], single.target_values[0, 0], rtol=1e-5, atol=1e-5)
    assert_close(a.seq, a.scores.sum(1))


def test_a_multi_token_string_target_is_a_continuation(gpt2_model):
    a = attribute(gpt2_model, TEXTS[1], target=" Paris is")
    b = attribute(gpt2_model, TEXTS[1], target=Continuation(" Paris is"))
    assert a.target["kind"] == "continuation" and torch.equal(a.scores, b.scores)


def test_continuation_in_padded_batches_equals_each_prompt_alone(qwen2_model):
    target = Continuation(" Paris is")
    batch = attribute(qwen2_model, TEXTS, method="integrated_gradients", steps=4, target=target)
    for i, text in enumerate(TEXTS):
        alone = attribute(qwen2_model, text, method="integrated_gradients", steps=4, target=target)
        real = batch.attention_mask[i].bool()
        assert_close(batch.scores[i][:, real], alone.scores[0], rtol=1e-4, atol=1e-5)
        assert_close(batch.delta[i], alone.delta[0], rtol=1e-3, atol=1e-5)


def test_continuation_after_right_padding_goes_after_each_rows_last_real_token(gpt2_model):
    rows = [gpt2_model.to_tokens(t)[0] for t in TEXTS]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    padded = attribute(gpt2_model, ids, attention_mask=mask, target=Continuation(" Paris is"))
    for i, r in enumerate(rows):
        alone = attribute(gpt2_model, r, target=Continuation(" Paris is"))
        assert_close(padded.scores[i][:, : len(r)], alone.scores[0], rtol=1e-4, atol=1e-5)
        assert torch.all(padded.scores[i][:, len(r):] == 0)
        assert padded.target_positions[i].tolist() == [len(r) - 1, len(r)]


def test_per_row_multi_token_strings_are_rejected(llama_model):
    with pytest.raises(GimlensError, match="exactly one token"):
        attribute(llama_model, TEXTS, target=[" Paris is", " Mary"])
