"""gimlens.attribute: input forms, BOS handling, the result object, bad input."""

import re

import pytest
import torch
from torch.testing import assert_close

import gimlens
from gimlens import GIM, GIMConfig, GimlensError
from gimlens.attribution import Continuation, LogitDiff, TokenTarget, attribute

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
    "Alice and Bob went to the park",
]


@pytest.mark.parametrize("method", ["gim", "feature_ablation"])
def test_a_text_batch_is_left_padded_and_each_row_equals_its_prompt_alone(any_model, method):
    batch = attribute(any_model, PROMPTS, method=method)
    assert batch.attention_mask is not None and batch.attention_mask[:, -1].all()
    for i, text in enumerate(PROMPTS):
        alone = attribute(any_model, text, method=method)
        real = batch.attention_mask[i].bool()
        assert batch.token_ids[i][real].tolist() == any_model.to_tokens(text)[0].tolist()
        assert_close(batch.scores[i][real], alone.scores[0], rtol=1e-4, atol=1e-5)
        assert torch.all(batch.scores[i][~real] == 0)
        assert batch.target_ids[i].tolist() == alone.target_ids[0].tolist()


def test_bos_is_its_own_baseline_unless_scored(llama_model):
    text = PROMPTS[0]
    plain = attribute(llama_model, text, method="gradient_x_input")
    with_bos = attribute(llama_model, text, method="gradient_x_input", score_bos=True)
    assert llama_model.to_tokens(text)[0, 0] == llama_model.tokenizer.bos_token_id
    assert plain.scores[0, 0] == 0 and not plain.scored[0, 0] and plain.scored[0, 1:].all()
    assert with_bos.scores[0, 0] != 0 and with_bos.scored[0].all()
    # the gradient is taken at the input, so the other positions do not depend on BOS's baseline
    assert_close(plain.scores[0, 1:], with_bos.scores[0, 1:])


def test_a_model_without_bos_scores_every_token(qwen2_model):
    a = attribute(qwen2_model, PROMPTS[1])
    assert not qwen2_model.cfg.default_prepend_bos
    assert a.scored.all() and (a.scores != 0).all()
    # by hand: GIM's gradient of the top logit at the embeddings, times (e - e(" ")) at every token
    ids = qwen2_model.to_tokens(PROMPTS[1])
    space = qwen2_model.tokenizer.encode(" ", add_special_tokens=False)[0]
    emb = qwen2_model.embed(ids).detach()
    leaf = emb.clone().requires_grad_()
    with GIM(qwen2_model):
        logits = qwen2_model.run_with_hooks(ids, fwd_hooks=[("hook_embed", lambda t, hook: leaf)])
    grad, = torch.autograd.grad(logits[0, -1].max(), leaf)
    want = (grad * (emb - qwen2_model.embed(torch.full_like(ids, space)).detach())).sum(-1)
    assert_close(a.scores, want, rtol=1e-4, atol=1e-6)


def test_explain_is_attribute_with_bos_scored_in_one_pass(gpt2_model):
    ids = gpt2_model.to_tokens(PROMPTS[1])
    via_attribute = attribute(gpt2_model, ids, method="gim", score_bos=True, target=17)
    assert_close(gimlens.explain(gpt2_model, ids, target_token_id=17), via_attribute.scores)
    plain = attribute(gpt2_model, ids, method="gradient_x_input", gim=False, score_bos=True, target=17)
    off = dict(freeze_norm=False, softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None)
    # explain always keeps the gated-MLP scales; GPT-2 has no gated MLP, so "all off" is plain
    assert_close(gimlens.explain(gpt2_model, ids, target_token_id=17, **off), plain.scores)


def test_the_result_describes_itself(llama_model):
    a = attribute(llama_model, PROMPTS[1], target=" Paris")
    ids = llama_model.to_tokens(PROMPTS[1])
    assert a.scores.dtype == torch.float32 and a.scores.device.type == "cpu"
    assert a.tokens[0] == llama_model.to_str_tokens(PROMPTS[1])
    assert a.target["kind"] == "token" and a.target["tokens"] == [[" Paris"]]
    paris = llama_model.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    assert a.target_ids.tolist() == [[paris]] and a.target_positions.tolist() == [[ids.shape[1] - 1]]
    with torch.no_grad():
        assert_close(float(a.target_values[0, 0]), float(llama_model(ids)[0, -1, paris]), rtol=1e-5, atol=1e-5)
    assert a.method == "gim" and a.config["gim"] == {f: getattr(GIMConfig(), f) for f in a.config["gim"]}
    assert a.config["baseline_token_id"] == llama_model.tokenizer.encode(" ", add_special_tokens=False)[0]
    assert a.delta is None and torch.equal(a.seq, a.scores)


def test_a_string_baseline_equals_its_token_id(llama_model):
    the = llama_model.tokenizer.encode(" the", add_special_tokens=False)
    assert len(the) == 1
    by_text = attribute(llama_model, PROMPTS[2], baseline=" the", method="integrated_gradients", steps=4)
    by_id = attribute(llama_model, PROMPTS[2], baseline=the[0], method="integrated_gradients", steps=4)
    assert_close(by_text.scores, by_id.scores)
    assert by_text.config["baseline_token_id"] == the[0]


def test_progress_bar_reports_batches(llama_model, capsys):
    attribute(llama_model, PROMPTS, method="integrated_gradients", steps=4, batch_size=4, progress=True)
    err = capsys.readouterr().err
    # 3 prompts and their baselines: 6 forward rows, 2 passes of 4; 3 prompts x 4 steps: 12
    # gradient rows, 3 passes of 4 (the bars, not the memory lines that also name the passes)
    assert re.search(r"forwards: 100%\|[^|]*\| 2/2 ", err), err
    assert re.search(r"gradients: 100%\|[^|]*\| 3/3 ", err), err


@pytest.mark.parametrize(
    "inputs, kwargs, match",
    [
        ("", {}, "empty"),
        (["The capital", ""], {}, "empty"),
        ([], {}, "inputs must be"),
        (3.5, {}, "inputs must be"),
        (torch.randn(4), {}, "integer"),
        (PROMPTS[1], dict(target=10**6), "vocabulary"),
        (PROMPTS[1], dict(target=TokenTarget(" Paris", position=50)), "outside the sequence"),
        (PROMPTS[1], dict(target=[1, 2]), "one per row"),
        (PROMPTS[1], dict(target=TokenTarget(" Paris Berlin", position=2)), "position"),
        (PROMPTS[1], dict(target=LogitDiff(" Paris")), "contrast"),
        (PROMPTS[1], dict(target=LogitDiff(" Paris", " Rome Berlin")), "exactly one token"),
        (PROMPTS[1], dict(target=Continuation("")), "empty"),
        (PROMPTS[1], dict(target=TokenTarget(" Paris", readout="prob")), "readout"),
        (PROMPTS[1], dict(target=2.5), "token id"),
        (PROMPTS[1], dict(baseline=" capital of"), "exactly one token"),
        (PROMPTS[1], dict(baseline=10**6), "baseline"),
        (PROMPTS[1], dict(method="feature_ablation", gim=True), "GIM does not apply"),
        (PROMPTS[1], dict(method="gim", gim=False), "gradient_x_input"),
        (PROMPTS[1], dict(method="gim", steps=5), "steps applies"),
        (PROMPTS[1], dict(method="integrated_gradients", steps=0), "steps"),
        (PROMPTS[1], dict(method="integrated_gradients", quadrature="simpson"), "quadrature"),
        (PROMPTS[1], dict(batch_size=0), "batch_size"),
        (PROMPTS[1], dict(attention_mask=torch.ones(1, 7)), "attention_mask"),
        (torch.tensor([[0, 52, 258]]), dict(attention_mask=torch.ones(1, 4)), "attention_mask"),
        (PROMPTS[1], dict(gim={"softmax_temp": 2.0}), "unknown GIM option"),
    ],
)
def test_bad_input_is_a_gimlens_error_and_leaves_the_model_as_found(llama_model, inputs, kwargs, match):
    with pytest.raises(GimlensError, match=match):
        attribute(llama_model, inputs, **kwargs)
