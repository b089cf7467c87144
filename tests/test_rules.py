"""Each GIM rule on raw tensors against a hand-derived Jacobian."""

import torch
from torch.testing import assert_close

from gimlens.rules import freeze, scale_grad, temperature_softmax, temperature_softmax_backward

#: The rule computes in float32 by design (returned in the scores' dtype): compare at that precision.
F32 = dict(atol=1e-6, rtol=1e-5)


def _randn(*shape, seed, **kw):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, **kw)


def test_temperature_rule_equals_jacobian_of_tempered_softmax():
    s, g = _randn(3, 5, seed=1), _randn(3, 5, seed=2)
    for T in (0.5, 1.0, 2.0, 7.0):
        p = torch.softmax(s / T, -1)
        jac = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # diag(s_T) - s_T s_T^T
        expected = (jac @ g.unsqueeze(-1)).squeeze(-1)
        assert_close(temperature_softmax_backward(s, g, T), expected, **F32)


def test_temperature_one_is_exact_softmax_gradient():
    s, g = _randn(4, 6, seed=3, requires_grad=True), _randn(4, 6, seed=4)
    (exact,) = torch.autograd.grad(torch.softmax(s, -1), s, g)
    assert_close(temperature_softmax_backward(s.detach(), g, 1.0), exact, **F32)


def test_temperature_rule_has_no_one_over_t_factor():
    # the exact gradient of softmax(s/T) w.r.t. s is J_T g / T; GIM drops the 1/T
    s, g = _randn(2, 5, seed=5, requires_grad=True), _randn(2, 5, seed=6)
    (tempered,) = torch.autograd.grad(torch.softmax(s / 3.0, -1), s, g)
    assert_close(temperature_softmax_backward(s.detach(), g, 3.0), 3.0 * tempered, **F32)


def test_temperature_function_keeps_pattern_and_routes_gradient_to_scores():
    s = _randn(2, 3, 4, 4, seed=7).tril() + torch.full((4, 4), -torch.inf).triu(1)
    s.requires_grad_(True)
    pattern = torch.softmax(s, -1)
    out = temperature_softmax(s, pattern, 2.0)
    assert torch.equal(out, pattern)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, s, g)
    assert_close(grad, temperature_softmax_backward(s.detach(), g, 2.0))
    assert torch.all(grad[..., torch.ones(4, 4).triu(1).bool()] == 0)  # masked keys get nothing


def test_fully_masked_row_gets_zero_not_nan():
    s = torch.full((1, 3), -torch.inf)
    assert torch.equal(temperature_softmax_backward(s, torch.ones(1, 3), 2.0), torch.zeros(1, 3))


def test_scale_grad_is_identity_forward_and_scales_backward():
    x = torch.randn(3, 4, requires_grad=True)
    y = scale_grad(x, 0.25)
    assert torch.equal(y, x)
    g = torch.randn(3, 4)
    (grad,) = torch.autograd.grad(y, x, g)
    assert_close(grad, 0.25 * g)


def test_frozen_layernorm_scale_gives_centring_jacobian_over_sigma():
    # y = (x - mean) / sigma with sigma frozen: dy/dx = (I - 11^T/d) / sigma
    d = 6
    x = torch.randn(d, dtype=torch.float64, requires_grad=True)
    xc = x - x.mean()
    sigma = (xc.pow(2).mean() + 1e-5).sqrt()
    y = xc / freeze(sigma)
    jac = torch.autograd.functional.jacobian(
        lambda t: (t - t.mean()) / freeze(((t - t.mean()).pow(2).mean() + 1e-5).sqrt()), x
    )
    expected = (torch.eye(d, dtype=torch.float64) - 1.0 / d) / sigma.detach()
    assert_close(jac, expected)
    assert torch.equal(y.detach(), xc.detach() / sigma.detach())
