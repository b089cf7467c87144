import math

import pytest
import torch

from gimlens import GimlensError
from gimlens.quadrature import Quadrature, nodes_and_weights


@pytest.mark.parametrize("rule", list(Quadrature))
def test_weights_sum_to_one_and_nodes_lie_in_unit_interval(rule):
    for steps in (7, 9, 32):
        alpha, w = nodes_and_weights(steps, rule)
        assert abs(float(w.sum()) - 1.0) < 1e-12
        assert float(alpha.min()) >= 0.0 and float(alpha.max()) <= 1.0


def test_gauss_legendre_is_exact_up_to_degree_2n_minus_1():
    alpha, w = nodes_and_weights(5)
    for k in range(10):
        assert abs(float((w * alpha**k).sum()) - 1.0 / (k + 1)) < 1e-13
    assert abs(float((w * alpha**10).sum()) - 1.0 / 11) > 1e-9  # degree 2n is not exact


def test_riemann_and_trapezoid_converge_at_their_orders():
    f = torch.exp
    exact = math.e - 1.0
    err = {}
    for rule in ("riemann_left", "trapezoid", "riemann_middle"):
        a16, w16 = nodes_and_weights(16, rule)
        a32, w32 = nodes_and_weights(32, rule)
        err[rule] = abs(float((w16 * f(a16)).sum()) - exact) / abs(float((w32 * f(a32)).sum()) - exact)
    assert 1.8 < err["riemann_left"] < 2.2  # first order
    assert 3.5 < err["trapezoid"] < 4.5 and 3.5 < err["riemann_middle"] < 4.5  # second order


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_steps_are_a_gimlens_error(bad):
    with pytest.raises(GimlensError, match="steps"):
        nodes_and_weights(bad)


def test_unknown_rule_lists_known_ones():
    with pytest.raises(GimlensError, match="gauss_legendre"):
        nodes_and_weights(4, "simpson")


def test_graded_rule_resolves_a_boundary_layer_that_plain_gauss_legendre_misses():
    # f(a) = d/da [a / sqrt(a^2 + e^2)]: all of its integral (1/sqrt(1+e^2)) lies in a ~e-wide layer
    e = 1e-4
    f = lambda a: e**2 / (a**2 + e**2) ** 1.5  # noqa: E731
    exact = 1.0 / math.sqrt(1.0 + e**2)
    a, w = nodes_and_weights(35, "gauss_legendre")
    plain = abs(float((w * f(a)).sum()) - exact)
    a, w = nodes_and_weights(35, "gauss_legendre_graded")
    graded = abs(float((w * f(a)).sum()) - exact)
    assert plain > 0.5 and graded < 5e-3
    assert len(a) == 35 and bool((a[1:] > a[:-1]).all())
    a, w = nodes_and_weights(63, "gauss_legendre_graded")
    assert abs(float((w * f(a)).sum()) - exact) < 1e-4  # and it converges


def test_graded_rule_needs_one_node_per_panel():
    with pytest.raises(GimlensError, match="steps >= 7"):
        nodes_and_weights(6, "gauss_legendre_graded")
