"""GIM where it was measured to help: per-method defaults for `gim=True` and a warning, once, for
a rule measured to hurt a method (docs/performance.md, "GIM per rule").

References: `circuits.attribute` with the explicit config the defaults name.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import importlib
from circuits import attribute, discover
from circuits.gim_advice import GIM_DEFAULTS, GIM_HURTS, gim_for
from circuits.graph import Graph
from circuits.tasks import make
from gimlens.gim import GIMConfig


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not warned yet."""
    monkeypatch.setattr(importlib.import_module("circuits.gim_advice"), "_WARNED", set())


@pytest.fixture(scope="module")
def task(llama_model):
    return make("ioi", llama_model, n=4, seed=0)


def _gim_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning) and "was measured" in str(w.message)]


def test_no_default_switches_on_a_rule_measured_to_hurt_its_method():
    assert "EAP-IG-inputs" in GIM_DEFAULTS and GIM_HURTS["EAP-IG-inputs"]
    # the q/k/v scales alone were measured to hurt EAP-IG-inputs on IOI: its default leaves them off
    assert all(GIM_DEFAULTS["EAP-IG-inputs"][f] is None for f in ("q_scale", "k_scale", "v_scale"))
    for method, defaults in GIM_DEFAULTS.items():
        config = GIMConfig().with_overrides(**defaults)
        assert not config.is_off
        for rule in GIM_HURTS.get(method, {}):
            for field in rule.split("/"):
                assert rule == "any" or getattr(config, field) in (None, False), (method, field)


@pytest.mark.parametrize("method", ["EAP", "EAP-IG-inputs"])
def test_gim_true_uses_the_methods_measured_defaults(llama_model, task, method, fresh):
    expected = GIMConfig().with_overrides(**GIM_DEFAULTS.get(method, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert gim_for(method, True) == expected
        got = discover(llama_model, Graph.from_model(llama_model), task, n_edges=20, method=method,
                       gim=True, ig_steps=2)
        ref = attribute(llama_model, Graph.from_model(llama_model), task, method=method, gim=expected,
                        ig_steps=2)
        every_rule = attribute(llama_model, Graph.from_model(llama_model), task, method=method,
                               gim=GIMConfig(), ig_steps=2)
    torch.testing.assert_close(got.scores, ref.scores)
    if expected != GIMConfig():
        assert not torch.allclose(got.scores, every_rule.scores)


@pytest.mark.parametrize("gim", [True, GIMConfig()])
def test_gim_measured_to_hurt_warns_once_per_process(llama_model, task, gim, fresh):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            discover(llama_model, Graph.from_model(llama_model), task, n_edges=20, method="EAP-IG-inputs",
                     gim=gim, ig_steps=2)
    hits = _gim_warnings(record)
    assert len(hits) == len(GIM_HURTS["EAP-IG-inputs"]) >= 1  # once per rule, not once per call
    assert all(w.filename == __file__ for w in hits)  # points at the caller of discover
    for rule, measured in GIM_HURTS["EAP-IG-inputs"].items():
        label = "GIM was" if rule == "any" else rule
        assert any(label in str(w.message) and "EAP-IG-inputs" in str(w.message) and measured in str(w.message)
                   for w in hits)


@pytest.mark.parametrize("method, gim", [("EAP", True), ("EAP", GIMConfig()), ("EAP-IG-inputs", None),
                                         ("EAP-IG-inputs", GIMConfig.off())])
def test_a_helping_or_neutral_combination_does_not_warn(llama_model, task, method, gim, fresh):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        discover(llama_model, Graph.from_model(llama_model), task, n_edges=20, method=method, gim=gim,
                 ig_steps=2)
    assert not _gim_warnings(record)


@pytest.mark.parametrize("method", ["EAP-IG-iterative", "edge-pruning"])
def test_the_search_methods_warn_with_gim_on_and_not_off(method, fresh):
    with pytest.warns(UserWarning, match=f"GIM was measured to make {method}"):
        gim_for(method, True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        gim_for(method, None)
    assert not _gim_warnings(record)


def test_attribute_keeps_every_rule_for_gim_true_but_warns_where_measured_to_hurt(llama_model, task, fresh):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = attribute(llama_model, Graph.from_model(llama_model), task, method="EAP-IG-inputs", gim=True,
                        ig_steps=2)
        again = attribute(llama_model, Graph.from_model(llama_model), task, method="EAP-IG-inputs",
                          gim=True, ig_steps=2)
    ref = attribute(llama_model, Graph.from_model(llama_model), task, method="EAP-IG-inputs", gim=GIMConfig(),
                    ig_steps=2)
    torch.testing.assert_close(got.scores, ref.scores)  # gim=True is GIM's definition: every rule
    torch.testing.assert_close(again.scores, ref.scores)
    hits = _gim_warnings(record)
    assert len(hits) == 1 and "EAP-IG-inputs" in str(hits[0].message)
    assert hits[0].filename == __file__  # points at the caller


@pytest.mark.parametrize("method, gim", [("EAP", True), ("EAP", GIMConfig()), ("EAP-IG-inputs", None)])
def test_attribute_does_not_warn_where_gim_was_not_measured_to_hurt(llama_model, task, method, gim, fresh):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        attribute(llama_model, Graph.from_model(llama_model), task, method=method, gim=gim, ig_steps=2)
    assert not _gim_warnings(record)
