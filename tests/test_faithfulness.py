"""gimlens.evaluate: comprehensiveness and sufficiency against a hand-written protocol loop,
Spearman against scipy, agreement with leave-one-out ablation."""

import math

import pytest
import scipy.stats
import torch
from torch.testing import assert_close

from gimlens import GimlensError
from gimlens.attribution import Attribution, Continuation, attribute
from gimlens.evaluate import (
    SUFFICIENCY_RATIOS,
    ablation_agreement,
    attribution_faithfulness,
    rankable_positions,
    spearman,
)

TEXTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
]


def _protocol_by_hand(model, attr, row, max_k=50, t=0):
    """The GIM paper's loop, one forward per replacement, on row ``row`` alone; for a
    continuation, target token ``t`` (read after the first ``t`` continuation tokens)."""
    real = attr.attention_mask[row].bool() if attr.attention_mask is not None else torch.ones_like(attr.scored[row])
    ids = attr.token_ids[row][real].clone()[None]
    scores = (attr.scores[row, t] if attr.is_continuation else attr.scores[row])[real]
    scored = attr.scored[row][real]
    target = int(attr.target_ids[row, t])
    given = attr.target_ids[row, :t][None]  # the continuation before target t

    def logit(x):
        with torch.no_grad():
            return float(model(torch.cat([x, given], 1))[0, -1, target])

    full = logit(ids)
    inner = torch.arange(1, ids.shape[1] - 1)  # first and last never ranked
    inner = inner[scored[inner]]
    ranking = inner[torch.argsort(scores[inner], descending=True, stable=True)]
    comp, x = [], ids.clone()
    for pos in ranking[:max_k]:
        x[0, pos] = attr.baseline_token_id
        comp.append((full - logit(x)) / full)
    suff = []
    for r in SUFFICIENCY_RATIOS:
        x = ids.clone()
        m = int(r * len(ranking))
        if m:
            x[0, ranking.flip(0)[:m]] = attr.baseline_token_id
        suff.append((full - logit(x)) / full)
    return comp, sum(suff) / len(suff), len(ranking), full


@pytest.mark.parametrize("method", ["gim", "integrated_gradients"])
def test_comprehensiveness_and_sufficiency_follow_the_papers_protocol(any_model, method):
    kw = {"steps": 4} if method == "integrated_gradients" else {}
    attr = attribute(any_model, TEXTS, method=method, **kw)
    got = attribution_faithfulness(any_model, attr, batch_size=7)
    paper = attribution_faithfulness(any_model, attr, short_rows="zero_fill")
    capped = attribution_faithfulness(any_model, attr, max_k=3)
    for row in range(len(TEXTS)):
        comp, s, n, full = _protocol_by_hand(any_model, attr, row)
        assert int(got.n_rankable[row]) == n == len(comp) and n >= 3
        assert_close(float(got.original[row]), full, rtol=1e-5, atol=1e-5)
        assert_close(got.comprehensiveness_curve[row, :n], torch.tensor(comp, dtype=torch.float64), rtol=1e-4, atol=1e-5)
        assert_close(float(got.comprehensiveness[row]), sum(comp) / n, rtol=1e-4, atol=1e-5)
        assert_close(float(got.sufficiency[row]), s, rtol=1e-4, atol=1e-5)
        assert_close(float(paper.comprehensiveness[row]), sum(comp) / 50, rtol=1e-4, atol=1e-5)
        assert_close(float(capped.comprehensiveness[row]), sum(comp[:3]) / 3, rtol=1e-4, atol=1e-5)
        assert torch.isnan(got.comprehensiveness_curve[row, n:]).all()
        assert not torch.isnan(got.comprehensiveness_curve[row, :n]).any()
    summary = got.summary()
    assert math.isclose(summary["comprehensiveness"], float(got.comprehensiveness.mean()), rel_tol=1e-12)


def test_rankable_positions_skip_padding_bos_and_each_rows_first_and_last_token(llama_model):
    attr = attribute(llama_model, TEXTS, score_bos=True)
    mask = rankable_positions(attr)
    for row in range(len(TEXTS)):
        real = attr.attention_mask[row].nonzero()[:, 0]
        expected = torch.zeros_like(mask[row])
        expected[real[1:-1]] = True
        assert torch.equal(mask[row], expected)


def test_replacing_by_the_baseline_changes_nothing_when_the_baseline_is_the_token(gpt2_model):
    # every prompt token replaced by itself: all metrics are exactly 0
    ids = torch.full((1, 6), 300)
    attr = attribute(gpt2_model, ids, baseline=300, method="gim", target=5)
    f = attribution_faithfulness(gpt2_model, attr)
    assert float(f.comprehensiveness[0]) == 0 and float(f.sufficiency[0]) == 0


def test_a_one_token_continuation_scores_like_the_token_target(qwen2_model):
    token = attribute(qwen2_model, TEXTS, target=" Paris")
    cont = attribute(qwen2_model, TEXTS, target=Continuation(" Paris"))
    a, b = attribution_faithfulness(qwen2_model, token), attribution_faithfulness(qwen2_model, cont)
    assert b.comprehensiveness.shape == (2, 1)
    assert_close(a.comprehensiveness, b.comprehensiveness[:, 0])
    assert_close(a.sufficiency, b.sufficiency[:, 0])


def test_multi_token_continuations_follow_the_protocol_per_target_token(llama_model):
    attr = attribute(llama_model, TEXTS, target=" Paris is")
    f = attribution_faithfulness(llama_model, attr)
    assert f.comprehensiveness.shape == (2, 2)
    for row in range(2):
        for t in range(2):
            comp, s, n, full = _protocol_by_hand(llama_model, attr, row, t=t)
            assert int(f.n_rankable[row, t]) == n
            assert_close(float(f.original[row, t]), full, rtol=1e-5, atol=1e-5)
            assert_close(float(f.comprehensiveness[row, t]), sum(comp) / n, rtol=1e-4, atol=1e-5)
            assert_close(float(f.sufficiency[row, t]), s, rtol=1e-4, atol=1e-5)


def test_spearman_equals_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    for n in (2, 5, 17):
        x = torch.randint(0, 4, (n,), generator=g).double()  # many ties
        y = torch.randn(n, generator=g, dtype=torch.float64)
        expected = scipy.stats.spearmanr(x.numpy(), y.numpy()).statistic
        got = float(spearman(x, y))
        assert (math.isnan(expected) and math.isnan(got)) or math.isclose(got, expected, abs_tol=1e-12)
    assert math.isnan(float(spearman(torch.ones(4), torch.arange(4.0))))
    assert math.isnan(float(spearman(torch.ones(1), torch.ones(1))))


def test_agreement_with_ablation(llama_model):
    loo = attribute(llama_model, TEXTS, method="feature_ablation")
    assert_close(ablation_agreement(llama_model, loo), torch.ones(2, dtype=torch.float64))
    gim = attribute(llama_model, TEXTS, method="gim")
    got = ablation_agreement(llama_model, gim)
    assert_close(got, ablation_agreement(llama_model, gim, reference=loo))
    for row in range(2):
        where = gim.scored[row]
        expected = scipy.stats.spearmanr(gim.scores[row][where].numpy(), loo.scores[row][where].numpy()).statistic
        assert math.isclose(float(got[row]), expected, abs_tol=1e-9)
    other = attribute(llama_model, TEXTS[::-1], method="feature_ablation")
    with pytest.raises(GimlensError, match="same inputs"):
        ablation_agreement(llama_model, gim, reference=other)


def test_metrics_work_on_an_attribution_read_back_from_json(gpt2_model, tmp_path):
    attr = attribute(gpt2_model, TEXTS)
    attr.save(tmp_path / "a.json")
    again = Attribution.load(tmp_path / "a.json")
    assert_close(attribution_faithfulness(gpt2_model, again).comprehensiveness, attribution_faithfulness(gpt2_model, attr).comprehensiveness)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_k=0), "max_k"),
        (dict(ratios=(0.5, 1.5)), "ratios"),
        (dict(short_rows="pad"), "short_rows"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments_are_gimlens_errors(llama_model, kwargs, match):
    attr = attribute(llama_model, TEXTS[1])
    with pytest.raises(GimlensError, match=match):
        attribution_faithfulness(llama_model, attr, **kwargs)


def test_an_attribution_from_another_vocabulary_is_rejected(llama_model):
    attr = attribute(llama_model, TEXTS[1])
    attr.target_ids = torch.tensor([[10**6]])
    with pytest.raises(GimlensError, match="vocabulary"):
        attribution_faithfulness(llama_model, attr)
    with pytest.raises(GimlensError, match="Attribution"):
        attribution_faithfulness(llama_model, {"scores": [1.0]})
