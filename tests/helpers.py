"""Shared test helpers: a snapshot of everything a gimlens call must leave as it found it."""

from __future__ import annotations

import socket

import torch


def free_port() -> int:
    """A free TCP port on the loopback interface, for a local torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_state(model) -> dict:
    """Hooks on every module and hook point, parameter flags and grads, modes and config flags."""
    hooks = {}
    for name, mod in model.named_modules():
        counts = (
            len(mod._forward_hooks),
            len(mod._forward_pre_hooks),
            len(mod._backward_hooks),
            len(getattr(mod, "_backward_pre_hooks", {})),
        )
        if any(counts):
            hooks[name] = counts
        fwd, bwd = getattr(mod, "fwd_hooks", None), getattr(mod, "bwd_hooks", None)
        if fwd or bwd:
            hooks[name + "#lens"] = (len(fwd or []), len(bwd or []))
    params = {
        n: (p.requires_grad, None if p.grad is None else p.grad.clone(), p.dtype, p.device)
        for n, p in model.named_parameters()
    }
    modes = {n: m.training for n, m in model.named_modules()}
    cfg = {k: v for k, v in vars(model.cfg).items() if isinstance(v, (bool, int, float, str, type(None)))}
    return {"hooks": hooks, "params": params, "modes": modes, "cfg": cfg}


def assert_state_equal(before: dict, after: dict) -> None:
    assert before["hooks"] == after["hooks"], "hooks left on the model"
    assert before["modes"] == after["modes"], "training mode changed"
    assert before["cfg"] == after["cfg"], "config flags changed"
    assert before["params"].keys() == after["params"].keys()
    for name, (rg, grad, dtype, device) in before["params"].items():
        rg2, grad2, dtype2, device2 = after["params"][name]
        assert (rg, dtype, device) == (rg2, dtype2, device2), f"parameter {name} changed"
        assert (grad is None) == (grad2 is None), f".grad of {name} changed"
        if grad is not None:
            assert torch.equal(grad, grad2), f".grad of {name} changed"
