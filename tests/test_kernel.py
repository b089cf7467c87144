"""The kernel's shared helpers: int and enum validation with one wording, the memory budget read
from psutil, and the one memory planner both packages use."""

from __future__ import annotations

import enum
import re

import numpy as np
import pytest

from gimlens.errors import GimlensError
from gimlens.memory import MemoryEstimate, fit_rows
from gimlens.runtime import available_memory
from gimlens.validation import check_int, coerce_enum, int_rule


class Color(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


@pytest.mark.parametrize("value, kw, expected", [
    (3, {}, 3), (0, {"minimum": 0}, 0), (5, {"minimum": 1, "maximum": 5}, 5), (np.int64(4), {"minimum": 1}, 4),
    (-2, {"maximum": -1}, -2), (None, {"allow_none": True}, None),
])
def test_check_int_passes_ints_within_bounds(value, kw, expected):
    got = check_int("n", value, **kw)
    assert got == expected and (got is None or type(got) is int)


@pytest.mark.parametrize("value, kw, message", [
    (0, {"minimum": 1}, "n must be an int >= 1, got 0"),
    (6, {"minimum": 1, "maximum": 5}, "n must be an int in [1, 5], got 6"),
    (0, {"maximum": -1}, "n must be an int <= -1, got 0"),
    (True, {}, "n must be an int, got True"),  # a bool is not a count
    (2.0, {"minimum": 1}, "n must be an int >= 1, got 2.0"),
    ("3", {}, "n must be an int, got '3'"),
    (None, {"minimum": 1}, "n must be an int >= 1, got None"),
    (0, {"minimum": 1, "allow_none": True}, "n must be an int >= 1 or None, got 0"),
    (9, {"minimum": 0, "maximum": 4, "note": "the scored edges"},
     "n must be an int in [0, 4] (the scored edges), got 9"),
])
def test_check_int_names_the_argument_the_rule_and_the_value(value, kw, message):
    with pytest.raises(GimlensError) as err:
        check_int("n", value, **kw)
    assert str(err.value) == message


def test_int_rule_is_the_words_check_int_uses():
    assert int_rule(1) == "an int >= 1" and int_rule(None, 3) == "an int <= 3"
    assert int_rule(0, 2, allow_none=True) == "an int in [0, 2] or None"


def test_coerce_enum_takes_a_member_or_its_value_and_names_the_known_values():
    assert coerce_enum(Color, "red", "colour") is Color.RED
    assert coerce_enum(Color, Color.BLUE, "colour") is Color.BLUE
    for bad in ("green", None, 3, "RED"):
        with pytest.raises(GimlensError) as err:
            coerce_enum(Color, bad, "colour")
        assert str(err.value) == f"unknown colour {bad!r}; expected one of 'red', 'blue'"


def test_the_old_import_path_of_coerce_enum_is_the_same_function():
    from gimlens import runtime, validation

    assert runtime.coerce_enum is validation.coerce_enum


# The wording is the same everywhere: bad ints and unknown enum values at public entry points of both
# packages give the helpers' messages.
INT_MESSAGE = re.compile(r"^(.*: )?[\w\-() ]+ must be an int( >= -?\d+| <= -?\d+| in \[-?\d+, -?\d+\])?( or None)?"
                         r"( \([^)]*\))?, got .+$")
ENUM_MESSAGE = re.compile(r"^(.*: )?unknown [\w\- ]+ .+; expected one of '.+'$")


def _int_errors(gpt2_model):
    import torch

    import circuits
    import gimlens
    from gimlens.quadrature import nodes_and_weights

    ids = torch.tensor([[1, 2, 3, 4]])
    graph = circuits.Graph.from_model(gpt2_model)
    return {
        "quadrature steps": lambda: nodes_and_weights(0, "gauss_legendre"),
        "attribute batch_size": lambda: gimlens.attribute(gpt2_model, ids, batch_size=0),
        "prune n": lambda: graph.copy().apply_topn(-1),
    }


def test_bad_ints_read_the_same_in_both_packages(gpt2_model):
    for name, call in _int_errors(gpt2_model).items():
        with pytest.raises(GimlensError) as err:
            call()
        assert INT_MESSAGE.match(str(err.value)), f"{name}: {err.value}"


def test_unknown_enum_values_read_the_same_in_both_packages(gpt2_model):
    import torch

    import circuits
    import gimlens

    ids = torch.tensor([[1, 2, 3, 4]])
    calls = {
        "attribution method": lambda: gimlens.attribute(gpt2_model, ids, method="nope"),
        "circuits ablation": lambda: circuits.evaluate(gpt2_model, circuits.Graph.from_model(gpt2_model), ids,
                                                       ids, lambda logits, *_: logits[:, -1, 0].mean(),
                                                       ablation="nope"),
        "kv_edges": lambda: circuits.Graph.from_model(gpt2_model, kv_edges="nope"),
    }
    for name, call in calls.items():
        with pytest.raises(GimlensError) as err:
            call()
        assert ENUM_MESSAGE.match(str(err.value)), f"{name}: {err.value}"


def test_available_memory_is_what_the_kernel_reads_from_meminfo():
    # an independent reference: Linux's MemAvailable (psutil reads the same figure)
    with open("/proc/meminfo", encoding="ascii") as fh:
        ref = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    got = available_memory("cpu")
    assert abs(got - ref) < 0.1 * ref + 512 * 2**20  # the two reads are moments apart


def test_one_estimate_type_for_token_and_edge_attribution(llama_model):
    import circuits
    from circuits._engine.memory import estimate_memory, example_bytes, fit_batch_size

    graph = circuits.Graph.from_model(llama_model)
    est = estimate_memory(llama_model, graph, 3, 16)
    assert type(est) is MemoryEstimate
    per_example, fixed, parts = example_bytes(llama_model, graph, 16)
    assert est.total == fixed + 3 * per_example == fixed + 3 * sum(n for _, n in parts)
    assert [name for name, _ in parts] == ["sources", "gradients", "activations", "logits"]
    # the edge planner is the kernel's: the largest batch within the budget, capped by `upper`
    budget = fixed + 5 * per_example + per_example // 2
    assert fit_batch_size(llama_model, graph, 16, budget) == 5
    assert fit_batch_size(llama_model, graph, 16, budget, upper=2) == 2
    assert fit_rows("x", per_row=per_example, n_rows=99, max_memory=budget, fixed=fixed).rows == 5
    with pytest.raises(GimlensError, match=r"^edge attribution: max_memory .* is below"):
        fit_batch_size(llama_model, graph, 16, fixed)
    text = str(est)
    assert text.startswith("edge attribution: about ") and "3 of 3 rows per pass" in text
    assert "sources " in text and "budget" not in text
