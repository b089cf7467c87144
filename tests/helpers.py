"""Shared test helpers: a snapshot of everything a gimlens call must leave as it found it."""

from __future__ import annotations

import socket

import torch


def free_port() -> int:
    """A free TCP port on the loopback interface, for a local torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def model_state(model) -> dict:
    """Everything a gimlens or circuits call must leave as it found it.

    Hooks by handle id (so a hook removed and another added is a change) on every module: torch's
    forward, forward-pre, backward and backward-pre hooks, a HookPoint's own `fwd_hooks` /
    `bwd_hooks` lists, and torch's global module hooks; every module's `training`; every
    parameter's `requires_grad`, `.grad` (a copy), dtype, device, storage and in-place version
    counter (so weights written in place and written back still count as changed); every buffer's
    storage and version; the config's scalar flags (the bridge's `use_attn_result`,
    `use_split_qkv_input`, `use_hook_mlp_in`, `use_attn_in`, ...).
    """
    import torch.nn.modules.module as torch_module

    hooks = {}
    for name, mod in model.named_modules():
        ids = tuple(tuple(getattr(mod, d, {}).keys()) for d in _HOOK_DICTS)
        if any(ids):
            hooks[name] = ids
        fwd, bwd = getattr(mod, "fwd_hooks", None), getattr(mod, "bwd_hooks", None)
        if fwd or bwd:
            hooks[name + "#lens"] = tuple(tuple(h.hook.id for h in hs or []) for hs in (fwd, bwd))
    hooks["#global"] = tuple(tuple(getattr(torch_module, d).keys()) for d in _GLOBAL_HOOKS)
    params = {
        n: (p.requires_grad, None if p.grad is None else p.grad.clone(), p.dtype, p.device,
            p.data_ptr(), p._version)
        for n, p in model.named_parameters()
    }
    buffers = {n: (b.data_ptr(), b._version) for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    cfg = {k: v for k, v in vars(model.cfg).items() if isinstance(v, (bool, int, float, str, type(None)))}
    return {"hooks": hooks, "params": params, "buffers": buffers, "modes": modes, "cfg": cfg}


def assert_state_equal(before: dict, after: dict) -> None:
    """Fails naming the first difference between two `model_state` snapshots."""
    for name in ("hooks", "modes", "cfg", "buffers"):
        changed = sorted(k for k in before[name].keys() | after[name].keys()
                         if before[name].get(k) != after[name].get(k))
        assert not changed, f"{name} changed: " + ", ".join(
            f"{k}: {before[name].get(k)} -> {after[name].get(k)}" for k in changed[:5])
    assert before["params"].keys() == after["params"].keys()
    for name, (rg, grad, *rest) in before["params"].items():
        rg2, grad2, *rest2 = after["params"][name]
        assert rg == rg2, f"requires_grad of {name} changed: {rg} -> {rg2}"
        assert rest == rest2, f"parameter {name} changed (dtype, device, storage, version): {rest} -> {rest2}"
        assert (grad is None) == (grad2 is None), f".grad of {name} changed"
        if grad is not None:
            assert torch.equal(grad, grad2), f".grad of {name} changed"
