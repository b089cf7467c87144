"""Edge attribution, exact patching and the faithfulness curve on TransformerLens 3.x's
`HookedTransformer`, against the `TransformerBridge` on identical weights.

Both models are built from the same tiny HuggingFace model (`tiny_hf_model(**TINY[name])`); the
HookedTransformer loads its weights unprocessed (no folding or centring), so every score,
patched metric and curve point must agree to float32 rounding. A second check loads it with
TransformerLens's default processing (folded norms, centred weights, folded value biases), under
which the scores are mathematically the same. CI runs this file in its TransformerLens 3.9
environment; elsewhere `tests/conftest.py` deselects it.
"""

import copy
import tempfile
import warnings

import pytest
import torch
from torch.testing import assert_close

from circuits import attribute
from circuits.evaluate import evaluate, faithfulness_curve
from circuits.graph import Graph
from circuits._engine.model import ModelSpec
from circuits._engine.sites import ModelKind, Site, model_kind
from gimlens.errors import GimlensError
from gimlens.testing import tiny_hf_model, tiny_model, tiny_tokenizer

from conftest import TINY
from helpers import assert_state_equal, model_state

pytestmark = pytest.mark.hooked_transformer

UNPROCESSED = dict(fold_ln=False, center_writing_weights=False, center_unembed=False,
                   fold_value_biases=False)

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "When Tom and Anna went to the park, Anna gave a ball to"]
CORRUPTED = ["When Mary and John went to the store, Paul gave a drink to",
             "When Tom and Anna went to the park, Lucy gave a ball to"]


def hooked_transformer(hf, tokenizer, **processing):
    """`HookedTransformer.from_pretrained` without the hub: the config is read from a folder
    holding `hf`'s config, the weights converted from `hf` itself."""
    from transformer_lens import HookedTransformer
    import transformer_lens.loading_from_pretrained as loading

    processing = {**UNPROCESSED, **processing}
    folder = tempfile.mkdtemp(prefix="gimlens-ht-")
    config = copy.deepcopy(hf.config)
    config.architectures = [type(hf).__name__]
    if hasattr(config, "n_positions"):  # TransformerLens 3.9 reads GPT-2's context as n_ctx
        config.n_ctx = config.n_positions
    config.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = loading.get_pretrained_model_config(folder, fold_ln=processing["fold_ln"], dtype=hf.dtype)
        state = loading.get_pretrained_state_dict(folder, cfg, hf, dtype=hf.dtype)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
        model.load_and_process_state_dict(state, **processing)
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
    """(bridge, HookedTransformer, tokens...) on the same weights."""
    name = request.param
    bridge = tiny_model(**TINY[name])
    ht = hooked_transformer(tiny_hf_model(**TINY[name]), tiny_tokenizer())
    clean, corrupted = bridge.to_tokens(CLEAN), bridge.to_tokens(CORRUPTED)
    return name, bridge, ht, clean, corrupted


def metric(logits, idx=None):
    return logits[:, -1, 5] - logits[:, -1, 7]


def test_hooked_transformer_reads_residual_stream_sites(pair):
    name, bridge, ht, *_ = pair
    spec = ModelSpec.read(ht)
    assert model_kind(bridge) is ModelKind.BRIDGE and spec.kind is ModelKind.HOOKED_TRANSFORMER
    assert spec.hook(Site.LN1_IN, 1) == "blocks.1.hook_resid_pre"
    assert spec.hook(Site.LN2_IN, 0) == "blocks.0.hook_mlp_in"
    assert spec.hook(Site.LN_FINAL_IN) == f"blocks.{ht.cfg.n_layers - 1}.hook_resid_post"
    assert spec.hook(Site.Q, 1) == ModelSpec.read(bridge).hook(Site.Q, 1) == "blocks.1.attn.hook_q"
    # same weights as the bridge's (grouped KV heads stored once per KV head)
    for mine, theirs in zip(spec.attn, ModelSpec.read(bridge).attn):
        for w in ("W_Q", "W_K", "W_V", "W_O"):
            assert_close(getattr(mine, w), getattr(theirs, w))
    assert_close(ht(pair[3]), bridge(pair[3]), atol=1e-5, rtol=1e-5)


METHODS = [("EAP", {}), ("EAP-IG-inputs", {}), ("EAP-IG-activations", {}),
           ("EAP-IG-activations", {"activations": "joint"}), ("clean-corrupted", {})]


@pytest.mark.parametrize("gim", [None, True], ids=["plain", "gim"])
@pytest.mark.parametrize("method,options", METHODS,
                         ids=["EAP", "IG-inputs", "IG-activations", "IG-activations-joint", "clean-corrupted"])
def test_hooked_transformer_scores_equal_bridge_scores(pair, method, options, gim):
    name, bridge, ht, clean, corrupted = pair
    kw = dict(method=method, gim=gim, steps=2, **options)
    want = attribute(bridge, Graph.from_model(bridge), clean, corrupted, metric, **kw)
    before = model_state(ht)
    got = attribute(ht, Graph.from_model(ht), clean, corrupted, metric, **kw)
    assert_state_equal(before, model_state(ht))  # hook_mlp_in switched back off, no hook left
    scale = want.scores.abs().max()
    assert scale > 0
    assert_close(got.scores, want.scores, atol=2e-6 * float(scale), rtol=1e-4)
    assert_close(got.completeness.metric_change, want.completeness.metric_change, atol=1e-5, rtol=1e-5)


def test_hooked_transformer_per_query_head_kv_scores_equal_bridge(pair):
    name, bridge, ht, clean, corrupted = pair
    want = attribute(bridge, Graph.from_model(bridge, kv_edges="per_query_head"), clean, corrupted,
                     metric, method="EAP-IG-inputs", steps=2)
    got = attribute(ht, Graph.from_model(ht, kv_edges="per_query_head"), clean, corrupted, metric,
                    method="EAP-IG-inputs", steps=2)
    assert_close(got.scores, want.scores, atol=2e-6 * float(want.scores.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("ablation", ["corrupted", "mean", "zero"])
def test_hooked_transformer_evaluate_equals_bridge(pair, ablation):
    name, bridge, ht, clean, corrupted = pair
    graph = attribute(bridge, Graph.from_model(bridge), clean, corrupted, metric)
    graph.apply_topn(15)
    mirror = Graph.from_model(ht)
    mirror.scores, mirror.in_graph = graph.scores.clone(), graph.in_graph.clone()
    want = evaluate(bridge, graph, clean, corrupted, metric, ablation=ablation)
    before = model_state(ht)
    got = evaluate(ht, mirror, clean, corrupted, metric, ablation=ablation)
    assert_state_equal(before, model_state(ht))
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and the endpoints are the model's own runs
    full = mirror.copy().reset(empty=False)
    assert_close(evaluate(ht, full, clean, corrupted, metric, ablation=ablation), metric(ht(clean)),
                 atol=1e-5, rtol=1e-5)
    if ablation == "corrupted":
        empty = mirror.copy().reset(empty=True)
        assert_close(evaluate(ht, empty, clean, corrupted, metric), metric(ht(corrupted)),
                     atol=1e-5, rtol=1e-5)


def test_hooked_transformer_faithfulness_curve_equals_bridge(pair):
    name, bridge, ht, clean, corrupted = pair
    graph = attribute(bridge, Graph.from_model(bridge), clean, corrupted, metric, method="EAP-IG-inputs")
    mirror = attribute(ht, Graph.from_model(ht), clean, corrupted, metric, method="EAP-IG-inputs")
    sizes = (0, 5, 20, 50, 100)
    want = faithfulness_curve(bridge, graph, clean, corrupted, metric, sizes=sizes)
    got = faithfulness_curve(ht, mirror, clean, corrupted, metric, sizes=sizes)
    assert got.n_edges == want.n_edges
    assert_close(torch.tensor(got.faithfulness), torch.tensor(want.faithfulness), atol=1e-4, rtol=1e-4)
    assert_close(got.cpr, want.cpr, atol=1e-4, rtol=1e-4)
    assert_close(got.cmd, want.cmd, atol=1e-4, rtol=1e-4)


def test_hooked_transformer_with_default_processing_gives_the_same_scores(pair):
    """Folded norms, centred writing weights and folded value biases leave every edge score
    unchanged mathematically (norms ignore the mean direction, scores use differences)."""
    name, bridge, ht, clean, corrupted = pair
    processed = hooked_transformer(tiny_hf_model(**TINY[name]), tiny_tokenizer(), fold_ln=True,
                                   center_writing_weights=True, center_unembed=True,
                                   fold_value_biases=True)
    assert processed.cfg.normalization_type in ("LNPre", "RMSPre")
    for gim in (None, True):
        want = attribute(bridge, Graph.from_model(bridge), clean, corrupted, metric, gim=gim)
        got = attribute(processed, Graph.from_model(processed), clean, corrupted, metric, gim=gim)
        assert_close(got.scores, want.scores, atol=1e-5 * float(want.scores.abs().max()), rtol=1e-3)


def test_mode_restored_after_a_failing_metric(pair):
    name, bridge, ht, clean, corrupted = pair
    before = model_state(ht)

    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        attribute(ht, Graph.from_model(ht), clean, corrupted, broken)
    assert_state_equal(before, model_state(ht))
    assert ht.cfg.use_hook_mlp_in is False


def test_attention_only_hooked_transformer_is_refused():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=8, d_head=4,
                                                      n_heads=4, d_vocab=32, attn_only=True,
                                                      act_fn="gelu", normalization_type="LN"))
    with pytest.raises(GimlensError, match="attn_only"):
        ModelSpec.read(model)
