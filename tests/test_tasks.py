"""circuits.tasks: shapes, labels that decode to what the prompt implies, corruptions, metrics by hand."""

import warnings
from collections import Counter

import pytest
import torch
from torch.testing import assert_close

from circuits.tasks import TASKS, KLMetric, MetricKind, Task, capitals, greater_than, induction, ioi, make
from circuits.tasks.capitals import CAPITALS
from gimlens import GimlensError
from gimlens.testing import TINY_NAMES, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _real_tokens(task: Task, i: int) -> list[int]:
    return task.clean[i, : int(task.answer_position[i]) + 1].tolist()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_clean_and_corrupted_have_equal_shape_and_padding_is_after_the_answer(tok, name):
    task = make(name, tok, n=12, seed=3)
    n, pos = task.clean.shape
    assert task.corrupted.shape == (n, pos) and n == len(task) == 12
    assert task.clean.dtype == task.corrupted.dtype == task.labels.dtype == torch.long
    assert task.labels.shape == (n, 2)
    assert bool((task.labels[:, 0] != task.labels[:, 1]).all())
    assert bool((task.clean[:, 0] == tok.bos_token_id).all())  # BOS by TransformerLens' convention
    mask = task.attention_mask if task.attention_mask is not None else torch.ones(n, pos, dtype=torch.long)
    for i in range(n):
        ap = int(task.answer_position[i])
        assert mask[i, : ap + 1].all() and not mask[i, ap + 1 :].any()
        # the real tokens re-tokenise from the prompt string
        assert tok.decode(_real_tokens(task, i)[1:]) == task.prompts[i]
        corrupted = task.corrupted[i, 1 : ap + 1].tolist()
        assert tok.decode(corrupted) == task.corrupted_prompts[i]


def test_ioi_names_are_single_tokens_and_labels_decode_to_io_then_s(tok):
    task = ioi(tok, n=24, seed=0)
    for i, prompt in enumerate(task.prompts):
        io, s = task.info["io"][i], task.info["s"][i]
        assert tok.decode(task.labels[i, 0]) == " " + io and tok.decode(task.labels[i, 1]) == " " + s
        words = prompt.replace(",", " ").replace(".", " ").split()
        assert words.count(io) == 1 and words.count(s) == 2, prompt
        tokens = tok.convert_ids_to_tokens(_real_tokens(task, i))
        assert tokens.count("Ġ" + io) == 1 and tokens.count("Ġ" + s) == 2
        # the first mention order is what ABBA / BABA says
        first = "ABBA" if words.index(io) < words.index(s) else "BABA"
        assert first == task.info["order"][i]


def test_ioi_orders_are_balanced_and_every_template_is_used(tok):
    task = ioi(tok, n=80, seed=5)
    assert Counter(task.info["order"]) == {"ABBA": 40, "BABA": 40}
    assert len(set(task.info["template"])) == 8


def test_ioi_corruption_replaces_exactly_the_three_names_with_other_distinct_names(tok):
    task = ioi(tok, n=30, seed=1)
    name_ids = {tok.encode(" " + w, add_special_tokens=False)[0] for w in TINY_NAMES}
    for i in range(len(task)):
        clean, corr = task.clean[i], task.corrupted[i]
        io, s = task.labels[i].tolist()
        name_pos = [p for p, t in enumerate(clean.tolist()) if t in (io, s)]
        differ = (clean != corr).nonzero().flatten().tolist()
        assert differ == name_pos and len(name_pos) == 3
        new = corr[name_pos].tolist()
        assert len(set(new)) == 3 and not set(new) & {io, s} and set(new) <= name_ids


def test_ioi_with_only_three_names_corrupts_with_a_permutation(tok):
    task = ioi(tok, n=6, seed=0, names=["Mary", "John", "Alice", "Qwxzyv"])
    assert set(task.info["io"]) | set(task.info["s"]) <= {"Mary", "John", "Alice"}
    for names in task.info["corrupted_names"]:
        assert sorted(names) == ["Alice", "John", "Mary"]


def test_ioi_refuses_fewer_than_three_single_token_names_and_bad_templates(tok):
    with pytest.raises(GimlensError, match="single tokens"):
        ioi(tok, n=4, names=["Mary", "John", "Qwxzyv", "Zzkrpt"])
    with pytest.raises(GimlensError, match="exactly once"):
        ioi(tok, n=4, templates=["When {A} and {B} went out, {A} gave it to"])
    with pytest.raises(GimlensError, match="unknown task"):
        make("ioi2", tok)


def test_tasks_built_from_a_model_follow_its_bos_convention(llama_model):
    task = make("ioi", llama_model, n=4, seed=0)
    expected = llama_model.to_tokens(task.prompts[0])[0]
    assert task.clean[0, : len(expected)].tolist() == expected.tolist()
    no_bos = ioi(llama_model.tokenizer, n=4, seed=0, prepend_bos=False)
    assert no_bos.clean.shape[1] == task.clean.shape[1] - 1


def _hand_logit_diff(task, logits, indices):
    out = []
    for row, i in enumerate(indices):
        ap = int(task.answer_position[i])
        out.append(float(logits[row, ap, task.labels[i, 0]]) - float(logits[row, ap, task.labels[i, 1]]))
    return torch.tensor(out)


@pytest.mark.parametrize("name", ["ioi", "capitals", "induction"])
def test_logit_diff_metric_equals_a_hand_computation(tok, name):
    task = make(name, tok, n=10, seed=2)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, task.clean.shape[1], len(tok), generator=g, dtype=torch.float64)
    assert task.metric_kind is MetricKind.LOGIT_DIFF
    got = task.metric(logits)
    assert got.dtype == torch.float32
    assert_close(got, _hand_logit_diff(task, logits, range(10)).float())
    idx = [7, 2, 5]
    assert_close(task.metric(logits[idx], idx), _hand_logit_diff(task, logits[idx], idx).float())


def test_metric_with_indices_equals_metric_for_in_every_calling_form(tok):
    task = ioi(tok, n=10, seed=4)
    logits = torch.randn(10, task.clean.shape[1], len(tok))
    full = task.metric(logits)
    for indices in (slice(2, 6), [1, 8, 3], torch.tensor([9, 0]), torch.arange(10) % 3 == 0):
        rows = torch.arange(10)[indices]
        sub = logits[rows]
        assert_close(task.metric(sub, indices), full[rows])
        assert_close(task.metric_for(indices)(sub), full[rows])
    assert [s for s in task.batches(4)] == [slice(0, 4), slice(4, 8), slice(8, 10)]
    with pytest.raises(GimlensError, match="expected logits"):
        task.metric(logits[:3], [0, 1])


def test_metric_gradient_is_plus_one_at_the_correct_and_minus_one_at_the_incorrect_label(tok):
    task = capitals(tok, n=3, seed=0)
    logits = torch.randn(3, task.clean.shape[1], len(tok), requires_grad=True)
    task.metric(logits).sum().backward()
    expected = torch.zeros_like(logits)
    for i in range(3):
        expected[i, -1, task.labels[i, 0]] += 1
        expected[i, -1, task.labels[i, 1]] -= 1
    assert_close(logits.grad, expected)


def test_subset_keeps_examples_and_metric_consistent(tok):
    task = ioi(tok, n=12, seed=7)
    sub = task.subset([3, 10])
    assert sub.prompts == (task.prompts[3], task.prompts[10])
    assert sub.info["io"] == (task.info["io"][3], task.info["io"][10])
    logits = torch.randn(12, task.clean.shape[1], len(tok))
    assert_close(sub.metric(logits[[3, 10]]), task.metric(logits)[[3, 10]])


def test_right_padding_leaves_the_scored_logits_as_an_unpadded_run(llama_model):
    task = ioi(llama_model, n=6, seed=0)
    assert task.attention_mask is not None  # templates of different lengths
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = task.metric(llama_model(task.clean, attention_mask=task.attention_mask))
        alone = [task.metric(llama_model(task.clean[i : i + 1, : int(task.answer_position[i]) + 1]), [i])
                 for i in range(6)]
    assert_close(batch, torch.cat(alone), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- greater-than


def test_greater_than_last_digit_labels_and_probability_difference_by_hand(tok):
    task = greater_than(tok, n=8, seed=0)
    assert task.info["mode"] == ("last_digit",) * 8 and task.metric_kind is MetricKind.PROB_DIFF
    digits = [int(tok.decode(t)) for t in task.answer_tokens]
    assert sorted(digits) == list(range(10))
    for i in range(8):
        year = task.info["year"][i]
        y = year % 10
        assert 1 <= y <= 8
        assert task.prompts[i].endswith(f"from the year {year} to the year {year // 10}")
        assert task.corrupted_prompts[i].endswith(f"from the year {year // 10}0 to the year {year // 10}")
        assert tok.decode(task.labels[i]) == f"{y + 1}{y}"
        differ = (task.clean[i] != task.corrupted[i]).nonzero().flatten().tolist()
        assert len(differ) == 1 and tok.decode(task.corrupted[i, differ]) == "0"
    logits = torch.randn(8, task.clean.shape[1], len(tok), dtype=torch.float64)
    expected = []
    for i in range(8):
        probs = torch.softmax(logits[i, int(task.answer_position[i])], -1)
        y = task.info["year"][i] % 10
        expected.append(sum(float(probs[t]) * (1 if d > y else -1) for t, d in zip(task.answer_tokens, digits)))
    assert_close(task.metric(logits), torch.tensor(expected, dtype=torch.float32))


def _two_digit_tokenizer():
    """A byte-level BPE that splits " 1732" into " 17" + "32", as GPT-2's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    merges = [("Ġ", "1")] + [("Ġ1", str(c)) for c in range(10)]
    merges += [(a, b) for a in "0123456789" for b in "0123456789"]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


def test_greater_than_two_digit_mode_scores_all_hundred_year_tokens():
    tok = _two_digit_tokenizer()
    assert tok.convert_ids_to_tokens(tok.encode(" 1732", add_special_tokens=False)) == ["Ġ17", "32"]
    task = greater_than(tok, n=6, seed=1)
    assert task.info["mode"] == ("two_digit",) * 6
    years = [tok.decode(t) for t in task.answer_tokens]
    assert years == [f"{yy:02d}" for yy in range(100)]
    for i in range(6):
        yy = task.info["year"][i] % 100
        assert 2 <= yy <= 98
        assert tok.decode(task.labels[i, 0]) == f"{yy + 1:02d}" and tok.decode(task.labels[i, 1]) == f"{yy:02d}"
        assert task.corrupted_prompts[i].endswith(f"year {task.info['year'][i] // 100}01 to the year "
                                                  f"{task.info['year'][i] // 100}")
        assert task.answer_sign[i].tolist() == [1.0 if v > yy else -1.0 for v in range(100)]
    logits = torch.zeros(6, task.clean.shape[1], len(tok))
    # all probability on one year token: PD = +1 when it is later than YY, -1 otherwise
    later = int(task.answer_tokens[99])
    logits[torch.arange(6), task.answer_position, later] = 100.0
    assert_close(task.metric(logits), torch.ones(6))


def test_greater_than_forced_two_digit_mode_on_a_digit_tokenizer_says_what_to_do(tok):
    with pytest.raises(GimlensError, match="try the other mode"):
        greater_than(tok, n=2, mode="two_digit")


# ----------------------------------------------------------------------------- capitals, induction


def test_capitals_labels_are_the_capital_and_the_corrupting_countrys_capital(tok):
    task = capitals(tok, n=10, seed=0)
    assert task.attention_mask is None
    assert set(task.info["country"][:5]) == {"France", "Germany", "Italy", "Spain", "Japan"}
    for i in range(10):
        country, other = task.info["country"][i], task.info["corrupted_country"][i]
        assert task.prompts[i] == f"The capital of {country} is" and country != other
        assert tok.decode(task.labels[i, 0]) == " " + CAPITALS[country]
        assert tok.decode(task.labels[i, 1]) == " " + CAPITALS[other]
        differ = (task.clean[i] != task.corrupted[i]).nonzero().flatten().tolist()
        assert len(differ) == 1 and tok.decode(task.corrupted[i, differ]) == " " + other


def test_induction_repeats_the_first_half_and_the_corruption_cannot_be_copied(tok):
    k = 6
    task = induction(tok, n=5, length=k, seed=0, corruption="second_half")
    special = set(tok.all_special_ids)
    assert task.clean.shape == (5, 2 * k)
    for i in range(5):
        x = task.clean[i, 1 : k + 1].tolist()
        assert len(set(x)) == k and not set(x) & special
        assert task.clean[i, k + 1 :].tolist() == x[:-1]
        assert task.corrupted[i, : k + 1].tolist() == task.clean[i, : k + 1].tolist()
        y = task.corrupted[i, k + 1 :].tolist()
        assert not set(y) & set(x) and len(set(y)) == k - 1
        assert task.labels[i, 0] == x[-1] and int(task.labels[i, 1]) not in set(x) | set(y)
        assert all(tok.decode(t).startswith(" ") for t in x + y)


@pytest.mark.parametrize("corruption", ["first_half", "last_token", None])
def test_induction_corruptions_keep_the_clean_prompts_and_remove_only_what_they_name(tok, corruption):
    k = 6
    default = induction(tok, n=5, length=k, seed=0, corruption="second_half")
    task = induction(tok, n=5, length=k, seed=0, **({} if corruption is None else {"corruption": corruption}))
    assert torch.equal(task.clean, default.clean) and torch.equal(task.labels, default.labels)
    for i in range(5):
        clean, corrupted = task.clean[i].tolist(), task.corrupted[i].tolist()
        x = clean[1 : k + 1]
        differs = [p for p in range(2 * k) if clean[p] != corrupted[p]]
        if corruption == "first_half":
            assert differs == list(range(1, k + 1))  # the copied sequence only; the repeat is kept
            z = corrupted[1 : k + 1]
            assert len(set(z)) == k and not set(z) & (set(x) | set(task.labels[i].tolist()))
        else:
            assert differs == [2 * k - 1]  # the query token only
            assert corrupted[-1] not in x and corrupted[-1] != int(task.labels[i, 1])
        assert corrupted[0] == clean[0]


def test_induction_rejects_an_unknown_corruption(tok):
    with pytest.raises(GimlensError, match="corruption must be one of"):
        induction(tok, n=2, corruption="middle")


# ----------------------------------------------------------------------------- KL divergence


def test_kl_metric_equals_torch_kl_div_in_eap_igs_direction(tok):
    task = ioi(tok, n=6, seed=0)
    g = torch.Generator().manual_seed(1)
    clean_logits = torch.randn(6, task.clean.shape[1], len(tok), generator=g)
    run_logits = torch.randn(6, task.clean.shape[1], len(tok), generator=g)
    rows, pos = torch.arange(6), task.answer_position
    log_p = torch.log_softmax(clean_logits[rows, pos], -1)
    kl = KLMetric(task, log_p)
    log_q = torch.log_softmax(run_logits[rows, pos], -1)
    # KL(clean || run): kl_div(input=log Q, target=log P) summed over the vocabulary
    expected = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none")
    assert_close(kl(run_logits), expected.sum(-1))
    hand = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert_close(kl(run_logits), hand)
    # EAP-IG's own scale: the mean over the vocabulary instead of the sum
    assert_close(KLMetric(task, log_p, vocab_mean=True)(run_logits), expected.mean(-1))
    # examples by index, as circuits.attribute / evaluate call it
    idx = torch.tensor([4, 1])
    assert_close(kl(run_logits[idx], idx), hand[idx])
    with pytest.raises(GimlensError, match="clean_log_probs"):
        KLMetric(task, log_p[:3])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_kl_metric_is_zero_on_the_clean_run_and_the_empty_circuit_gives_the_corrupted_kl(llama_model, name):
    import circuits

    task = make(name, llama_model, n=5, seed=1)
    kl = task.kl_metric(llama_model, batch_size=2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = llama_model(task.clean, attention_mask=task.attention_mask)
        corrupted = llama_model(task.corrupted, attention_mask=task.attention_mask)
    assert_close(kl(clean), torch.zeros(5), atol=1e-5, rtol=0)
    corrupted_kl = kl(corrupted)
    assert bool((corrupted_kl > 1e-4).all())
    empty = circuits.Graph.from_model(llama_model).reset(empty=True)
    assert_close(circuits.evaluate(llama_model, empty, task, metric=kl), corrupted_kl, atol=1e-5, rtol=1e-4)
    full = circuits.Graph.from_model(llama_model)
    assert_close(circuits.evaluate(llama_model, full, task, metric=kl), torch.zeros(5), atol=1e-5, rtol=0)


def test_kl_metric_has_zero_gradient_at_the_clean_run_so_eap_scores_vanish(gpt2_model):
    import circuits

    task = make("ioi", gpt2_model, n=4, seed=0)
    kl = task.kl_metric(gpt2_model)
    eap = circuits.attribute(gpt2_model, circuits.Graph.from_model(gpt2_model), task, metric=kl, method="EAP")
    ig = circuits.attribute(gpt2_model, circuits.Graph.from_model(gpt2_model), task, metric=kl,
                            method="EAP-IG-inputs")
    ig_max = float(ig.scores.abs().max())
    assert ig_max > 0 and float(eap.scores.abs().max()) < 1e-4 * ig_max


# ------------------------------------------------------------------ the real models: SmolLM2, Gemma 3


def _clean_metric(model, task, batch_size=16):
    out, top = [], []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in task.batches(batch_size):
            mask = None if task.attention_mask is None else task.attention_mask[s]
            logits = model(task.clean[s], attention_mask=mask)
            out.append(task.metric(logits, s))
            top.append(task.top1(logits, s))
    return torch.cat(out), torch.cat(top).float()


def _is_gemma(model) -> bool:
    return "gemma" in model.cfg.model_name.lower()


@pytest.mark.slow
def test_real_model_solves_ioi(real_model):
    metric, _ = _clean_metric(real_model, ioi(real_model, n=64, seed=0))
    print(f"{real_model.cfg.model_name} IOI: logit diff {metric.mean():.3f}, accuracy {(metric > 0).float().mean():.3f}")
    assert metric.mean() > 2 and (metric > 0).float().mean() > 0.8


@pytest.mark.slow
def test_real_model_knows_capitals(real_model):
    task = capitals(real_model, n=48, seed=0)
    assert len(set(task.info["country"])) >= 20
    metric, top1 = _clean_metric(real_model, task)
    print(f"{real_model.cfg.model_name} capitals: top-1 {top1.mean():.3f}, logit diff {metric.mean():.3f}")
    assert (metric > 0).float().mean() > 0.9  # the country's capital over another country's
    # Gemma 3 270M ranks the right capital over the wrong one on every prompt (logit difference
    # 10.1) but mostly continues with " the" / " a" first (measured top-1 0.167)
    assert top1.mean() > (0.1 if _is_gemma(real_model) else 0.6)


@pytest.mark.slow
def test_real_model_does_induction_mostly_on_the_repeated_sequence(real_model):
    task = induction(real_model, n=48, seed=0, corruption="second_half")  # the whole repeat removed
    clean, _ = _clean_metric(real_model, task)
    corrupted, _ = _clean_metric(real_model, Task(**{**task.__dict__, "clean": task.corrupted}))
    print(f"{real_model.cfg.model_name} induction: logit diff {clean.mean():.3f} (corrupted {corrupted.mean():.3f})")
    assert clean.mean() > 2 and clean.mean() - corrupted.mean() > 5
    # SmolLM2 has no preference without the repeat; Gemma 3 keeps some (measured 4.0 against 15.8)
    assert corrupted.mean().abs() < (6 if _is_gemma(real_model) else 1)


@pytest.mark.slow
def test_real_model_prefers_later_years(real_model):
    task = greater_than(real_model, n=48, seed=0)
    assert task.info["mode"][0] == "last_digit"  # both split numbers into digits
    clean, _ = _clean_metric(real_model, task)
    corrupted, _ = _clean_metric(real_model, Task(**{**task.__dict__, "clean": task.corrupted}))
    print(f"{real_model.cfg.model_name} greater-than: prob diff {clean.mean():.3f} (corrupted {corrupted.mean():.3f})")
    assert clean.mean() > 0.5 and clean.mean() - corrupted.mean() > 0.5
