"""Token attribution within a memory budget: any split into passes gives the same result, a budget
too small for one row is refused, and the estimate of gimlens.memory bounds the peak resident memory
measured in a fresh process (gradient passes: from above; forward passes: within 30%)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from torch.testing import assert_close

import gimlens.memory
from gimlens import GimlensError
from gimlens.attribution import attribute
from gimlens.evaluate import attribution_faithfulness
from gimlens.layerwise import layerwise_ig
from gimlens.memory import PassKind, fit_rows, resolve_budget, row_bytes
from gimlens.runtime import format_bytes

TEXTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
]
METHODS = {
    "gim": {},
    "gradient_x_input": {},
    "integrated_gradients": {"steps": 5},
    "feature_ablation": {},
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Passes:
    """Counts the model's forward passes (a hook on the first block's input)."""

    def __init__(self, model):
        self.model, self.n = model, 0

    def __enter__(self):
        def count(t, hook):
            self.n += 1

        self._ctx = self.model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", count)])
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _one_row(model, pos, kind, gim=False):
    """A budget that holds exactly one row of the given pass."""
    return row_bytes(model, pos, kind, gim=gim) + 1


@pytest.mark.parametrize("method", list(METHODS))
def test_one_row_per_pass_gives_the_unsplit_scores(any_model, method):
    kw = METHODS[method]
    whole = attribute(any_model, TEXTS, method=method, max_memory="64GB", **kw)
    pos = whole.token_ids.shape[1]
    kind = PassKind.FORWARD if method == "feature_ablation" else PassKind.GRADIENTS
    budget = _one_row(any_model, pos, kind, gim=method == "gim")
    with _Passes(any_model) as passes:
        split = attribute(any_model, TEXTS, method=method, max_memory=budget, **kw)
    if method == "integrated_gradients":  # F(x), F(x') of both prompts, then 2 x 5 gradient rows
        per_forward = min(4, budget // row_bytes(any_model, pos, PassKind.FORWARD))
        expected = -(-4 // per_forward) + 10
    elif method == "feature_ablation":  # both prompts, then one variant per scored position
        expected = 2 + int(whole.scored.sum())
    else:
        expected = 2
    assert passes.n == expected
    assert_close(split.scores, whole.scores, rtol=1e-5, atol=1e-6)
    assert_close(split.target_values, whole.target_values, rtol=1e-5, atol=1e-6)
    if whole.delta is not None:
        assert_close(split.delta, whole.delta, rtol=1e-4, atol=1e-5)


def test_faithfulness_split_into_one_variant_per_pass_equals_the_unsplit_values(llama_model):
    attr = attribute(llama_model, TEXTS)
    whole = attribution_faithfulness(llama_model, attr, max_memory="64GB")
    budget = _one_row(llama_model, attr.token_ids.shape[1], PassKind.FORWARD)
    split = attribution_faithfulness(llama_model, attr, max_memory=budget)
    assert_close(split.comprehensiveness_curve, whole.comprehensiveness_curve, equal_nan=True)
    assert_close(split.sufficiency, whole.sufficiency)


@pytest.mark.parametrize("granularity", ["layer", "att", "mlp"])
def test_layerwise_ig_split_by_memory_equals_the_unsplit_flows(gpt2_model, granularity):
    tokens = gpt2_model.to_tokens(TEXTS[0])
    whole = layerwise_ig(gpt2_model, tokens, layers=1, granularity=granularity, steps=6)
    budget = _one_row(gpt2_model, tokens.shape[1], PassKind.BLOCK)
    split = layerwise_ig(gpt2_model, tokens, layers=1, granularity=granularity, steps=6,
                         max_memory=budget)
    a, b = whole.flow(1, granularity), split.flow(1, granularity)
    assert_close(b.matrix, a.matrix, rtol=1e-4, atol=1e-6)
    if a.heads is not None:
        assert_close(b.heads, a.heads, rtol=1e-4, atol=1e-6)


def test_a_budget_below_one_row_is_refused_naming_budget_and_need(llama_model):
    ids = llama_model.to_tokens(TEXTS[0])
    need = row_bytes(llama_model, ids.shape[1], PassKind.GRADIENTS)
    with pytest.raises(GimlensError, match=r"max_memory 1\.0 KiB is below the .* one row needs") as err:
        attribute(llama_model, ids, method="integrated_gradients", steps=4, max_memory=1024)
    assert format_bytes(need) in str(err.value)
    attr = attribute(llama_model, ids)
    with pytest.raises(GimlensError, match="max_memory"):
        attribution_faithfulness(llama_model, attr, max_memory=1024)
    with pytest.raises(GimlensError, match="layerwise_ig: max_memory"):
        layerwise_ig(llama_model, ids, layers=0, max_memory=1024)
    with pytest.raises(GimlensError, match="max_memory must be"):
        attribute(llama_model, ids, max_memory="lots")


def test_the_default_budget_is_a_share_of_the_free_memory(llama_model, monkeypatch):
    monkeypatch.setattr(gimlens.memory, "available_memory", lambda device: 10_000)
    assert resolve_budget(None, "cpu") == int(gimlens.memory.DEFAULT_FRACTION * 10_000)
    with pytest.raises(GimlensError, match=r"max_memory 4\.9 KiB"):
        attribute(llama_model, TEXTS[0])  # default max_memory=None


def test_fit_rows_takes_the_most_rows_that_fit_and_the_callers_cap():
    plan = fit_rows("x", per_row=100, n_rows=50, max_memory=1_050, fixed=20)
    assert (plan.rows, plan.total) == (10, 1_020)
    assert fit_rows("x", per_row=100, n_rows=50, max_memory=10**6, upper=7).rows == 7
    assert fit_rows("x", per_row=100, n_rows=3, max_memory=10**6).rows == 3


def test_progress_prints_the_estimate_to_stderr(llama_model, capsys):
    attribute(llama_model, TEXTS[0], method="integrated_gradients", steps=3, progress=True,
              max_memory="1GB")
    err = capsys.readouterr().err
    assert "gimlens memory estimate: integrated_gradients (gradients): about" in err
    assert "budget 953.7 MiB" in err


def test_steps_and_ig_steps_are_one_setting(llama_model):
    a = attribute(llama_model, TEXTS[1], method="integrated_gradients", steps=6)
    b = attribute(llama_model, TEXTS[1], method="integrated_gradients", ig_steps=6)
    assert_close(a.scores, b.scores)
    assert b.config["steps"] == 6
    with pytest.raises(GimlensError, match="steps or ig_steps"):
        attribute(llama_model, TEXTS[1], method="integrated_gradients", steps=6, ig_steps=6)
    with pytest.raises(GimlensError, match="integrated_gradients only"):
        attribute(llama_model, TEXTS[1], method="gim", ig_steps=6)


# The estimate against a measurement: a fresh process, the high-water mark of its resident set
# reset just before one attribution call; big enough a call (~200 MB) that the attribution's own
# memory dominates the noise of the allocator and the interpreter.
_CHILD = textwrap.dedent("""
    import gc, json, sys
    import torch
    torch.set_num_threads(1)
    import gimlens
    import gimlens.attribution.methods as methods
    from gimlens.testing import tiny_model

    def status(key):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    method, rows, pos, kw, model_kw = json.loads(sys.argv[1])
    model = tiny_model("llama", **model_kw)
    ids = torch.randint(10, 500, (rows, pos), generator=torch.Generator().manual_seed(0))
    plans, planned = [], methods.fit_rows
    methods.fit_rows = lambda *a, **k: plans.append(planned(*a, **k)) or plans[-1]
    gimlens.attribute(model, ids[:1, :4], method=method, **kw)  # warm-up
    plans.clear()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = status("VmRSS")
    gimlens.attribute(model, ids, method=method, **kw)
    print(json.dumps([status("VmHWM") - before, max(p.total for p in plans)]))
""")


def _measure(method, rows, pos, kw, model_kw):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",  # freed tensors leave the resident set
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([method, rows, pos, kw, model_kw])],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    measured, estimate = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured > 100 * 2**20  # the call's own memory dominates
    return measured, estimate


def test_forward_passes_are_estimated_within_30_percent_of_the_measured_peak():
    measured, estimate = _measure("feature_ablation", 2, 120, {"batch_size": 236}, {})
    assert 0.7 <= estimate / measured <= 1.3, (estimate, measured)


WIDE = {"n_heads": 8, "n_kv_heads": 4}


@pytest.mark.parametrize("method, rows, pos, kw, model_kw", [
    ("integrated_gradients", 4, 120, {"steps": 32, "batch_size": 128}, {}),
    ("gim", 128, 120, {"batch_size": 128}, {}),
    # long prompts, where the attention scores (x positions squared) dominate, as for a 2,000-token
    # prompt on SmolLM2: the per-layer scores, one layer's backward temporaries at the peak (GIM: one
    # more), and integrated gradients over several passes (nothing of a pass kept into the next)
    ("gradient_x_input", 4, 1000, {"batch_size": 4}, {}),
    ("gim", 4, 1000, {"batch_size": 4}, WIDE),
    ("integrated_gradients", 1, 1000, {"steps": 4, "batch_size": 2}, WIDE),
])
def test_gradient_passes_are_estimated_above_the_measured_peak(method, rows, pos, kw, model_kw):
    measured, estimate = _measure(method, rows, pos, kw, model_kw)
    assert 1.0 <= estimate / measured <= 1.4, (estimate, measured)
